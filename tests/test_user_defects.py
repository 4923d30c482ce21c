"""What a new user meets first: output text as HF decodes it (leading spaces, whole characters),
streaming that joins to the final text and never runs past a stop string, all streamed prompts in
flight together, and clear errors. Real tokenizers (stories260K: SentencePiece-style with byte
fallback; books-16M: byte-level BPE) against HF's own decode."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error, cli
from conftest import FIXTURES
from transformers import AutoTokenizer

from trtc.errors import TrtcError
from trtc.runtime.detokenizer import Detokenizer
from trtc.runtime.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
WORDS = [" dog", "Café", " naïve", " 日本", "🙂", " ", "\n", " was", "."]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """The stories260K HF directory and a float32 engine of it, built with the CLI's defaults."""
    hf_dir = FIXTURES / "stories260K"
    if not hf_dir.is_dir():
        pytest.skip(f"{hf_dir} is absent")
    engine = tmp_path_factory.mktemp("stories") / "engine"
    result = cli("build", "--model_dir", hf_dir, "--output_dir", engine, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    return hf_dir, engine


def hf_output_text(tokenizer, prompt_ids, output_ids) -> str:
    """HF's decode of prompt + output, less the decode of the prompt."""
    whole = tokenizer.decode(prompt_ids + output_ids, skip_special_tokens=True)
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    assert whole.startswith(prompt)
    return whole[len(prompt):]


def random_text_ids(tokenizer, rng: random.Random, n_pieces: int) -> list[int]:
    """Tokens of random words, many of them multi-byte characters split over byte tokens."""
    vocab = [i for i in range(512) if "\ufffd" not in tokenizer.decode([i])]  # whole characters
    ids = []
    for _ in range(n_pieces):
        if rng.random() < 0.5:
            ids.append(rng.choice(vocab))
        else:
            ids += tokenizer(rng.choice(WORDS), add_special_tokens=False).input_ids
    return ids


@pytest.mark.parametrize("model", ["stories260K", "books-16M"])
def test_detokenizer_equals_hf_decode_of_prompt_and_output(fixtures_dir, model):
    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / model)
    rng = random.Random(0)
    for _ in range(150):
        prompt = tokenizer("The dog" if rng.random() < 0.5 else "Once upon a time").input_ids[: rng.randrange(0, 6)]
        output = random_text_ids(tokenizer, rng, rng.randrange(1, 14))
        detok = Detokenizer(tokenizer, prompt)
        step = rng.randrange(1, 4)
        deltas = [detok.push(output[i: i + step]) for i in range(0, len(output), step)] + [detok.flush()]
        assert "".join(deltas) == detok.text == hf_output_text(tokenizer, prompt, output)
        assert not any("\ufffd" in d for d in deltas)  # a character is released only when complete
    # "The dog" + " was": the space is the output's
    detok = Detokenizer(tokenizer, tokenizer("The dog").input_ids)
    assert detok.push(tokenizer(" was", add_special_tokens=False).input_ids[-1:]).startswith(" ")


def test_detokenizer_holds_back_stop_strings(fixtures_dir):
    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "books-16M")
    output = tokenizer(" The Republic of Plato, the republic, the end", add_special_tokens=False).input_ids
    for stop, expected in [(["Republic of"], " The "), (["the end", "Plato,"], " The Republic of "),
                           (["nowhere"], " The Republic of Plato, the republic, the end")]:
        detok = Detokenizer(tokenizer, [], stop)
        deltas = []
        for t in output:
            deltas.append(detok.push([t]))
            shown = "".join(deltas)
            assert not any(s in shown for s in stop) and expected.startswith(shown)
        deltas.append(detok.flush())
        assert "".join(deltas) == detok.text == expected
        assert detok.stopped == (expected != " The Republic of Plato, the republic, the end")


def test_detokenizer_cost_does_not_grow_with_the_output(fixtures_dir):
    """Each token decodes a window of a few tokens, however long the output is."""
    tokenizer = AutoTokenizer.from_pretrained(fixtures_dir / "stories260K")
    sizes = []

    class Counting:
        def decode(self, ids, **kw):
            sizes.append(len(ids))
            return tokenizer.decode(ids, **kw)

    output = random_text_ids(tokenizer, random.Random(1), 600)
    detok = Detokenizer(Counting(), tokenizer("Once upon a time").input_ids)
    for t in output:
        detok.push([t])
    detok.flush()
    assert len(output) > 600 and max(sizes) <= 16 and len(sizes) <= 2 * len(output) + 2
    assert detok.text == hf_output_text(tokenizer, tokenizer("Once upon a time").input_ids, output)


def test_llm_output_keeps_its_leading_space_and_streams_join(stories):
    from trtc.llm import LLM

    hf_dir, engine = stories
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    params = SamplingParams(max_tokens=24)
    with LLM(engine, kv_cache_max_tokens=4096) as llm:
        out = llm.generate("The dog", params)
        assert out.text.startswith(" was") and out.text == hf_output_text(tokenizer, out.prompt_token_ids, out.token_ids)
        steps = list(llm.generate_stream("The dog", params))
        assert steps[-1].text == out.text and steps[-1].token_ids == out.token_ids
        assert all(a.text == b.text[: len(a.text)] for a, b in zip(steps, steps[1:]))


def test_streamed_text_never_passes_a_stop_string(stories):
    """A stop string over several tokens: nothing past its start is ever on screen."""
    from trtc.llm import LLM

    _, engine = stories
    with LLM(engine, kv_cache_max_tokens=4096) as llm:
        full = llm.generate("Once upon a time", SamplingParams(max_tokens=24)).text
        stop = "little girl"
        assert stop in full
        steps = list(llm.generate_stream("Once upon a time", SamplingParams(max_tokens=24, stop=[stop])))
    assert steps[-1].finish_reason == "stop" and steps[-1].text == full[: full.find(stop)]
    assert all("little" not in s.text for s in steps)
    result = cli("run", "--engine_dir", engine, "--input_text", "Once upon a time", "--max_output_len", 24,
                 "--stop_words", stop, "--streaming")
    assert result.exit_code == 0, result.output
    assert "little" not in result.output and f"Output [Text 0 Beam 0]: {full[: full.find(stop)]}\n" in result.output


def test_streaming_runs_all_prompts_in_flight(stories, tmp_path):
    """`generate_stream_batch` steps every prompt together: as many engine steps as the longest
    request, and the same outputs as `generate`; `run --streaming` prints them in prompt order."""
    from trtc.llm import LLM

    _, engine = stories
    prompts = ["Once upon a time", "The dog", "x" * 3000, "Lily went"]  # the third is too long: rejected
    params = SamplingParams(max_tokens=16)
    with LLM(engine, kv_cache_max_tokens=4096) as llm:
        expected = llm.generate(prompts, params)
        steps = 0
        step = llm.executor.step

        def counting_step():
            nonlocal steps
            steps += 1
            return step()

        llm.executor.step = counting_step
        last = {}
        for i, out in llm.generate_stream_batch(prompts, params):
            last[i] = out
    assert steps <= 16 + 1
    assert last[2].error is not None and last[2].finish_reason == "error"
    for i in (0, 1, 3):
        assert last[i].finished and last[i].text == expected[i].text and last[i].token_ids == expected[i].token_ids
    result = cli("run", "--engine_dir", engine, "--input_text", *prompts, "--max_output_len", 16, "--streaming",
                 "--output_json", tmp_path / "o.json")
    assert result.exit_code != 0 and "input 2 rejected" in result.output
    records = json.loads((tmp_path / "o.json").read_text())
    for i in (0, 1, 3):
        assert f'Input [Text {i}]: "{prompts[i]}"\nOutput [Text {i} Beam 0]: {expected[i].text}\n' in result.output
        assert records[i]["output_text"] == expected[i].text


def test_generate_after_close_is_a_clear_error(stories):
    from trtc.llm import LLM

    _, engine = stories
    llm = LLM(engine, kv_cache_max_tokens=1024)
    llm.close()
    llm.close()  # twice is fine
    for call in (lambda: llm.generate("The dog"), lambda: next(llm.generate_stream("The dog"))):
        with pytest.raises(TrtcError, match="closed"):
            call()


# The CLI on stories260K: defaults that work, errors that name what the user typed --------------------
def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`python -m trtc.cli ARGS` in a fresh process (its stdout and stderr apart)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "trtc.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or REPO, timeout=300)


def test_eval_defaults_work_on_an_engine_of_max_seq_len_512(stories, fixtures_dir):
    _, engine = stories
    result = cli("eval", "--engine_dir", engine, "--dataset", fixtures_dir / "text" / "alice_in_wonderland.txt",
                 "--max_tokens", 1200)
    assert result.exit_code == 0, result.output
    assert "windows of 511 from BOS" in result.output and "alice_in_wonderland.txt" in result.output
    result = cli("eval", "--engine_dir", engine, "--dataset", fixtures_dir / "text" / "alice_in_wonderland.txt",
                 "--max_seq_len", 512)
    assert_one_line_error(result, "--window_len 512", "[2, 511]")
    assert "perplexity" not in result.output  # refused before the table's header


def test_run_input_files_that_cannot_be_read(stories, tmp_path):
    _, engine = stories
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_file", tmp_path / "latin1.txt"),
                          "--input_file", "not UTF-8")
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_file", tmp_path), "is a directory")
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_file", tmp_path / "nope.txt"), "does not exist")
    (tmp_path / "latin1.txt").rename(tmp_path / "latin1.jsonl")
    assert_one_line_error(cli("eval", "--engine_dir", engine, "--dataset", tmp_path / "latin1.jsonl"), "not UTF-8")


def test_run_eval_bench_agree_on_what_is_not_an_engine(stories, tmp_path):
    """A checkpoint or an HF directory given as --engine_dir: the same answer from the three commands,
    with the command that builds an engine from it."""
    hf_dir, engine = stories
    assert cli("convert", "--model_dir", hf_dir, "--output_dir", tmp_path / "ckpt").exit_code == 0
    (tmp_path / "text.txt").write_text("Once upon a time there was a dog. " * 20)
    commands = {"run": ["--input_text", "The dog"], "eval": ["--dataset", tmp_path / "text.txt"],
                "bench": ["--num_requests", 1]}
    for command, args in commands.items():
        assert_one_line_error(cli(command, "--engine_dir", tmp_path / "ckpt", *args),
                              "is a trtc checkpoint", f"trtc build --checkpoint_dir {tmp_path / 'ckpt'}")
        assert_one_line_error(cli(command, "--engine_dir", hf_dir, *args),
                              "is an HF model directory", f"trtc build --model_dir {hf_dir}")
        assert_one_line_error(cli(command, "--engine_dir", tmp_path / "text.txt", *args), "is a file, not a directory")
    from trtc.llm import LLM

    with pytest.raises(TrtcError, match="trtc build --checkpoint_dir"):
        LLM(tmp_path / "ckpt")


def test_errors_name_the_flags_the_user_typed(stories, tmp_path):
    _, engine = stories
    base = ["run", "--engine_dir", engine, "--input_text", "The dog"]
    result = cli(*base, "--max_output_len", 0)
    assert_one_line_error(result, "--max_output_len", ">= 1")
    assert "max_tokens" not in result.output
    assert_one_line_error(cli(*base, "--end_id", 512), "--end_id 512", "vocabulary of 512")
    assert_one_line_error(cli(*base, "--kv_cache_max_tokens", 8), "--kv_cache_max_tokens 8")
    # an --output_json that cannot be written is refused before generating
    result = cli(*base, "--max_output_len", 4, "--output_json", tmp_path / "missing" / "out.json")
    assert_one_line_error(result, "--output_json", "does not exist")
    assert "Output [Text 0" not in result.output
    for command, args in (("eval", ["--dataset", tmp_path / "t.txt"]), ("bench", [])):
        (tmp_path / "t.txt").write_text("The dog ran. " * 50)
        assert_one_line_error(cli(command, "--engine_dir", engine, *args, "--output_json", tmp_path / "t.txt" / "o.json"),
                              "--output_json", "is a file")


def test_convert_without_tokenizer_says_so(tmp_path):
    from models import make_hf_model

    hf = make_hf_model(tmp_path / "hf", "llama3_gqa")
    proc = run_cli("convert", "--model_dir", hf, "--output_dir", tmp_path / "ckpt")
    assert proc.returncode == 0, proc.stderr
    assert "has no tokenizer" in proc.stderr and "token ids only" in proc.stderr and "warning" not in proc.stdout


def test_stderr_shows_trtc_lines_only(stories, tmp_path):
    """The --max_seq_len warning on stderr; transformers' "Token indices sequence length" and
    ModelOpt's and transformers' lines during quantize are not shown."""
    hf_dir, engine = stories
    proc = run_cli("build", "--model_dir", hf_dir, "--output_dir", tmp_path / "e", "--max_seq_len", 1024)
    assert proc.returncode == 0, proc.stderr
    assert "max_position_embeddings" in proc.stderr and "warning" not in proc.stdout
    proc = run_cli("eval", "--engine_dir", engine, "--dataset", FIXTURES / "text" / "alice_in_wonderland.txt",
                   "--max_tokens", 600)
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("[trtc] ")] == []
    pytest.importorskip("modelopt")
    from models import WORDS, add_word_tokenizer, make_hf_model

    hf = add_word_tokenizer(make_hf_model(tmp_path / "hf", "llama2_tied_bias"))  # tied: ModelOpt logs about the tie
    (tmp_path / "calib.txt").write_text(" ".join(WORDS[i % 100] for i in range(400)))
    proc = run_cli("quantize", "--model_dir", hf, "--output_dir", tmp_path / "q", "--qformat", "fp8", "--calib_dataset",
                   tmp_path / "calib.txt", "--calib_size", 2, "--calib_max_seq_len", 64, "--skip_report")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stderr.splitlines() if not line.startswith("[trtc] ")] == [], proc.stderr


def test_cpu_kv_cache_is_capped_and_sized_by_the_flag(stories, tmp_path):
    """An engine of max_seq_len 100000: the CPU pool holds one such sequence, not
    max_batch_size x max_seq_len tokens (32 GB here); --kv_cache_max_tokens (or TensorRT-LLM's
    --max_tokens_in_paged_kv_cache) sets it."""
    from trtc.runtime.executor import Executor
    from trtc.runtime.kv_cache import kv_bytes_per_token

    hf_dir, _ = stories
    engine = tmp_path / "long"
    assert cli("build", "--model_dir", hf_dir, "--output_dir", engine, "--max_seq_len", 100000).exit_code == 0
    ex = Executor(engine)
    try:
        tokens = ex.num_blocks * ex.engine.build_config.tokens_per_block
        assert tokens == 100000 and tokens * kv_bytes_per_token(ex.engine) < 2**30
    finally:
        ex.close()
    for flag in ("--kv_cache_max_tokens", "--max_tokens_in_paged_kv_cache"):
        proc = run_cli("run", "--engine_dir", engine, "--input_text", "The dog", "--max_output_len", 4, flag, 4096)
        assert proc.returncode == 0, proc.stderr
        assert "KV cache 128 blocks x 32 tokens = 4096 tokens" in proc.stderr
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "The dog", "--kv_cache_max_tokens", 10**12),
                          "--kv_cache_max_tokens", "GiB")


def test_bench_reports_what_it_ran(stories, tmp_path):
    _, engine = stories
    result = cli("bench", "--engine_dir", engine, "--isl", 8, "--osl", 4, "--num_requests", 6,
                 "--output_json", tmp_path / "t.json")
    assert result.exit_code == 0, result.output
    t = json.loads((tmp_path / "t.json").read_text())
    assert t["num_requests"] == 6 and t["concurrency"] == 6 and "6 requests, concurrency 6" in result.output
    result = cli("bench", "--engine_dir", engine, "--isl", 8, "--osl", 4, "--latency", "--batch_size", 2,
                 "--num_requests", 4, "--output_json", tmp_path / "l.json")
    assert result.exit_code == 0, result.output
    lat = json.loads((tmp_path / "l.json").read_text())
    assert lat["num_requests"] == 4 and lat["concurrency"] == 2 and lat["mode"] == "latency"
    assert_one_line_error(cli("bench", "--engine_dir", engine, "--latency", "--batch_size", 2, "--num_requests", 3),
                          "--num_requests 3", "--batch_size 2")


def test_every_option_has_help_and_choices():
    from click import Choice

    from trtc.cli import main
    from trtc.runtime.sampling_params import SamplingParams

    for name, command in main.commands.items():
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"trtc {name} {param.opts[0]} has no help text"
    kv_dtype = next(p for p in main.commands["build"].params if p.name == "kv_cache_dtype")
    assert isinstance(kv_dtype.type, Choice) and "fp8" in kv_dtype.type.choices
    assert "max_tokens" in SamplingParams.__doc__ and "stop" in SamplingParams.__doc__


def test_progress_bars_on_request_and_quiet_otherwise(stories, capsys):
    """bench's finished requests and eval's tokens: a bar with progress=True; nothing when not on a
    terminal (progress=None under pytest) or with --quiet."""
    from trtc.runtime.executor import Executor
    from trtc.tools.bench import run_requests
    from trtc.tools.perplexity import perplexity

    _, engine = stories
    ex = Executor(engine, kv_cache_max_tokens=4096, enable_prefix_reuse=False)  # as `trtc eval` runs it
    try:
        for progress in (True, None, False):
            run_requests(ex, [[5, 6, 7]] * 3, 2, 3, progress=progress)
            perplexity(ex, list(range(10, 300)), 128, 1, progress=progress)
            err = capsys.readouterr().err
            assert ("bench:" in err and "eval:" in err and "/290" in err) == (progress is True), err
    finally:
        ex.close()
    proc = run_cli("bench", "--engine_dir", engine, "--isl", 8, "--osl", 2, "--num_requests", 2, "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr

"""`trtc build` and `trtc run` end to end on CPU: greedy output equals HF `generate`, builds are
byte-identical, and bad input ends in a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_helpers import assert_one_line_error, cli
from models import CASES, add_word_tokenizer, load_hf, make_hf_model, text_of
from transformers import AutoTokenizer

NEW_TOKENS = 32


def hf_greedy(hf_dir, prompt_ids, n=NEW_TOKENS):
    with torch.no_grad():
        out = load_hf(hf_dir).generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                       eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One HF dir (with a tokenizer) and one engine per architecture; small blocks and budget so
    that prompts are prefilled in chunks over several blocks."""
    root = tmp_path_factory.mktemp("e2e")
    built = {}
    for case in CASES:
        hf_dir = add_word_tokenizer(make_hf_model(root / f"hf_{case}", case))
        result = cli("build", "--model_dir", hf_dir, "--output_dir", root / f"engine_{case}",
                     "--tokens_per_block", 4, "--max_num_tokens", 16, "--max_batch_size", 4)
        assert result.exit_code == 0, result.output
        built[case] = (hf_dir, root / f"engine_{case}")
    return built


@pytest.mark.parametrize("case", list(CASES))
def test_run_greedy_equals_hf_generate(case, engines, tmp_path):
    hf_dir, engine = engines[case]
    g = torch.Generator().manual_seed(3)
    prompts = [text_of(torch.randint(3, 131, (n,), generator=g).tolist()) for n in (3, 9, 21)]
    result = cli("run", "--engine_dir", engine, "--input_text", *prompts, "--max_output_len", NEW_TOKENS,
                 "--end_id", -1, "--output_json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "out.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    for prompt, record in zip(prompts, records):
        assert record["input_text"] == prompt
        assert record["input_ids"] == tokenizer(prompt).input_ids
        assert record["output_ids"] == hf_greedy(hf_dir, record["input_ids"])
        assert record["finish_reason"] == "length" and len(record["output_ids"]) == NEW_TOKENS
        # the output's text is the decode of prompt + output less the prompt's: it keeps its leading space
        whole = tokenizer.decode(record["input_ids"] + record["output_ids"], skip_special_tokens=True)
        assert record["output_text"] == whole[len(tokenizer.decode(record["input_ids"], skip_special_tokens=True)):]
    assert f'Output [Text 2 Beam 0]: "{records[2]["output_text"]}"' in result.output


@pytest.mark.parametrize("model", ["stories260K", "books-16M"])
def test_run_fixture_model_equals_hf(fixtures_dir, tmp_path, model):
    hf_dir = fixtures_dir / model
    result = cli("build", "--model_dir", hf_dir, "--output_dir", tmp_path / "engine", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    prompts = ["Once upon a time", "It was a dark and stormy night"]
    result = cli("run", "--engine_dir", tmp_path / "engine", "--input_text", *prompts, "--max_output_len", 48,
                 "--output_json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    for record in json.loads((tmp_path / "out.json").read_text()):
        assert record["output_ids"] == hf_greedy(hf_dir, record["input_ids"], 48)
    if model == "stories260K":
        assert "there was a little girl named Lily" in result.output


def test_build_is_byte_identical_and_defaults(engines, tmp_path):
    hf_dir, _ = engines["qwen2_tied"]
    assert cli("convert", "--model_dir", hf_dir, "--output_dir", tmp_path / "ckpt").exit_code == 0
    for name in ("a", "b"):
        result = cli("build", "--checkpoint_dir", tmp_path / "ckpt", "--output_dir", tmp_path / name)
        assert result.exit_code == 0, result.output
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert any(str(f) == "rank0.engine" for f in files)
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["build_config"]["max_seq_len"] == 256  # the model's max_position_embeddings
    assert config["build_config"]["cuda_graph_batch_sizes"] == [1, 2, 4, 8, *range(16, 256, 16), 256]
    assert config["format"] == "trtc-engine" and config["backend"] == "cuda"
    assert config["target"]["device"] == "cpu" and config["pretrained_config"]["graph"]["vocab_size"] == 131


def test_streaming_prints_the_same_text(engines):
    _, engine = engines["llama3_gqa"]
    args = ["run", "--engine_dir", engine, "--input_text", "w1 w2 w3", "--max_output_len", 12, "--end_id", -1]
    plain, streamed = cli(*args), cli(*args, "--streaming")
    assert plain.exit_code == 0 and streamed.exit_code == 0
    text = plain.output.splitlines()[1].split(": ", 1)[1].strip('"')
    assert streamed.output.splitlines()[1] == f"Output [Text 0 Beam 0]: {text}"


def test_sampling_flags_and_seed(engines):
    _, engine = engines["llama3_gqa"]
    args = ["run", "--engine_dir", engine, "--input_text", "w1 w2 w3", "--max_output_len", 16, "--end_id", -1,
            "--temperature", 1.5, "--top_k", 50, "--top_p", 0.95, "--repetition_penalty", 1.1]
    a, b = cli(*args, "--random_seed", 7), cli(*args, "--random_seed", 7)
    c = cli(*args, "--random_seed", 8)
    assert a.exit_code == 0 and a.output == b.output and a.output != c.output


def test_prompt_longer_than_max_seq_len_rejected_others_continue(engines, tmp_path):
    _, engine = engines["llama3_gqa"]
    long_prompt = " ".join(["w5"] * 300)  # max_seq_len is 256
    result = cli("run", "--engine_dir", engine, "--input_text", "w1 w2", long_prompt, "w3", "--max_output_len", 4,
                 "--output_json", tmp_path / "out.json")
    assert result.exit_code == 1
    assert "input 1 rejected" in result.output and "max_seq_len" in result.output and "Traceback" not in result.output
    records = json.loads((tmp_path / "out.json").read_text())
    assert [r["finish_reason"] for r in records] == ["length", "error", "length"]
    assert len(records[0]["output_ids"]) == 4 and len(records[2]["output_ids"]) == 4


@pytest.mark.parametrize("flag, value, words", [
    ("--top_p", 0, ["top_p", "(0, 1]"]),
    ("--top_p", 1.5, ["top_p"]),
    ("--temperature", -1, ["temperature", ">= 0"]),
    ("--max_output_len", 0, ["max_tokens"]),
])
def test_invalid_sampling_values(engines, flag, value, words):
    _, engine = engines["llama3_gqa"]
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "w1", flag, value), *words)


@pytest.fixture
def engine_copy(engines, tmp_path):
    _, engine = engines["llama3_gqa"]
    shutil.copytree(engine, tmp_path / "engine")
    return tmp_path / "engine"


def test_missing_engine_dir(tmp_path):
    assert_one_line_error(cli("run", "--engine_dir", tmp_path / "none", "--input_text", "w1"), "does not exist")


def test_missing_engine_file(engine_copy):
    (engine_copy / "rank0.engine").unlink()
    assert_one_line_error(cli("run", "--engine_dir", engine_copy, "--input_text", "w1"), "rank0.engine", "missing")


def test_corrupt_engine_file(engine_copy):
    path = engine_copy / "rank0.engine"
    path.write_bytes(path.read_bytes()[:1000])
    assert_one_line_error(cli("run", "--engine_dir", engine_copy, "--input_text", "w1"), "rank0.engine", "rebuild")


def test_corrupt_engine_config(engine_copy):
    (engine_copy / "config.json").write_text("{")
    assert_one_line_error(cli("run", "--engine_dir", engine_copy, "--input_text", "w1"), "config.json", "rebuild")


def test_engine_of_another_version(engine_copy):
    config = json.loads((engine_copy / "config.json").read_text())
    config["format_version"], config["trtc_version"] = 99, "9.9.0"
    (engine_copy / "config.json").write_text(json.dumps(config))
    assert_one_line_error(cli("run", "--engine_dir", engine_copy, "--input_text", "w1"), "format version 99", "rebuild")


def test_engine_for_another_gpu(engine_copy):
    config = json.loads((engine_copy / "config.json").read_text())
    config["target"] = {"device": "cuda", "compute_capability": "9.0", "gpu_name": "NVIDIA H200"}
    (engine_copy / "config.json").write_text(json.dumps(config))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("this machine has the GPU the engine names")
    assert_one_line_error(cli("run", "--engine_dir", engine_copy, "--input_text", "w1"), "compute capability 9.0", "rebuild")


def test_build_bad_input(engines, tmp_path):
    hf_dir, _ = engines["llama3_gqa"]
    assert_one_line_error(cli("build", "--checkpoint_dir", tmp_path / "nope", "--output_dir", tmp_path / "o"), "does not exist")
    assert_one_line_error(cli("build", "--output_dir", tmp_path / "o"), "--checkpoint_dir", "--model_dir")
    assert_one_line_error(cli("build", "--model_dir", hf_dir, "--output_dir", tmp_path / "o", "--tokens_per_block", 3),
                          "power of two")
    assert_one_line_error(cli("build", "--model_dir", hf_dir, "--output_dir", tmp_path / "o", "--kv_cache_dtype", "int2"),
                          "int2")
    assert_one_line_error(cli("build", "--model_dir", hf_dir, "--output_dir", tmp_path / "o", "--max_batch_size", 0),
                          "max_batch_size")
    assert not (tmp_path / "o").exists()


def test_stop_words_and_input_file(engines, tmp_path):
    _, engine = engines["llama3_gqa"]
    base = ["run", "--engine_dir", engine, "--max_output_len", 16, "--end_id", -1, "--output_json", tmp_path / "o.json"]
    (tmp_path / "prompts.txt").write_text("w1 w2 w3\n\nw4 w5\n")
    assert cli(*base, "--input_file", tmp_path / "prompts.txt").exit_code == 0
    records = json.loads((tmp_path / "o.json").read_text())
    assert [r["input_text"] for r in records] == ["w1 w2 w3", "w4 w5"]
    words = records[0]["output_text"].split()
    stop = words[5]
    assert cli(*base, "--input_text", "w1 w2 w3", "--stop_words", stop).exit_code == 0
    stopped = json.loads((tmp_path / "o.json").read_text())[0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["output_text"] == records[0]["output_text"][: records[0]["output_text"].find(stop)]

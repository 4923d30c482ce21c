"""What a new user meets first: output text as HF decodes it (leading spaces, whole characters),
streaming that joins to the final text and never runs past a stop string, all streamed prompts in
flight together, and clear errors. Real tokenizers (stories260K: SentencePiece-style with byte
fallback; books-16M: byte-level BPE) against HF's own decode."""

from __future__ import annotations

import json
import random

import pytest
from cli_helpers import cli
from transformers import AutoTokenizer

from trtc.errors import TrtcError
from trtc.runtime.detokenizer import Detokenizer
from trtc.runtime.sampling_params import SamplingParams

WORDS = [" dog", "Café", " naïve", " 日本", "🙂", " ", "\n", " was", "."]


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """The stories260K HF directory and a float32 engine of it, built with the CLI's defaults."""
    from conftest import FIXTURES

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

"""LoRA adapters per request: PEFT adapters (random non-zero A and B) on tiny random Llama and Qwen2
models; greedy tokens equal PEFT's model with that adapter and their logprobs within 1e-4; a batch
mixing three adapters and the base equals each request alone; more adapters than slots (LRU) change
nothing; prefix-cache blocks are never shared across adapters; bad adapters are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from models import add_word_tokenizer, make_hf_model, text_of
from transformers import AutoModelForCausalLM

from trtc import LLM, LoRARequest, SamplingParams, TrtcError
from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 33, 2 + i, 80, 41, 9, 100 + i] * 5 for i in range(8)]  # 40 tokens: a full block of 32
GREEDY = SamplingParams(max_tokens=12, end_id=-1, logprobs=True)


def make_adapter(base_dir, out_dir, seed: int, r: int, targets=ALL, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)
    peft_model = peft.get_peft_model(model, cfg)
    with torch.no_grad():  # larger B than PEFT's random init, so each adapter changes the greedy tokens
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(4.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def peft_greedy(base_dir, adapter_dir, prompt: list[int]) -> tuple[list[int], list[float]]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = peft.PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0], -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=["llama3_gqa", "qwen2_tied"])
def setup(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lora_{request.param}")
    base = add_word_tokenizer(make_hf_model(root / "hf", request.param))
    adapters = [make_adapter(base, root / "a0", 1, 8),
                make_adapter(base, root / "a1", 2, 4, targets=["q_proj", "v_proj", "down_proj"]),
                make_adapter(base, root / "a2", 3, 16, use_rslora=True)]
    engine = build_from_hf(base, root / "engine", dtype="float32",
                           build_config=BuildConfig(max_batch_size=16, max_seq_len=128), progress=False)
    loras = [LoRARequest(f"adapter{i}", i + 1, str(a)) for i, a in enumerate(adapters)]
    return base, adapters, engine, loras


def test_greedy_tokens_and_logprobs_equal_peft(setup):
    base, adapters, engine, loras = setup
    with LLM(engine, enable_lora=True, max_loras=4, max_lora_rank=16) as llm:
        for adapter, lora in [(None, None), *zip(adapters, loras)]:
            want, want_lp = peft_greedy(base, adapter, PROMPTS[0])
            out = llm.generate(PROMPTS[0], GREEDY, lora_request=lora).outputs[0]
            assert out.token_ids == want, lora
            assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(want_lp), atol=1e-4)
    tokens = {peft_greedy(base, a, PROMPTS[0])[0][:6].__repr__() for a in [None, *adapters]}
    assert len(tokens) == 4, "each adapter changes the output (otherwise the test shows nothing)"


def test_a_mixed_batch_equals_each_request_alone(setup):
    _, _, engine, loras = setup
    choice = [None, loras[0], loras[1], loras[2], loras[0], None, loras[2], loras[1]]
    with LLM(engine, enable_lora=True, max_loras=4, max_lora_rank=16, enable_prefix_reuse=False) as llm:
        alone = [llm.generate(p, GREEDY, lora_request=lr).token_ids for p, lr in zip(PROMPTS, choice)]
        together = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, lora_request=choice)]
    assert together == alone


def test_more_adapters_than_slots_and_prefix_cache_keyed_by_adapter(setup):
    _, _, engine, loras = setup
    with LLM(engine, enable_lora=True, max_loras=4, max_lora_rank=16, enable_prefix_reuse=False) as llm:
        want = [llm.generate(PROMPTS[1], GREEDY, lora_request=lr).token_ids for lr in [None, *loras]]
    with LLM(engine, enable_lora=True, max_loras=1, max_lora_rank=16) as llm:  # one slot: each adapter evicts the last
        for _ in range(2):
            outs = [llm.generate(PROMPTS[1], GREEDY, lora_request=lr) for lr in [None, *loras]]
            assert [o.token_ids for o in outs] == want
        # Same prompt, same adapter: its first block comes from the cache; another adapter's never does.
        again = llm.generate(PROMPTS[1], GREEDY, lora_request=loras[2])
        assert again.num_cached_tokens == 32 and again.token_ids == want[3]
        other = llm.generate(PROMPTS[2], GREEDY, lora_request=loras[0])
        shared = llm.generate(PROMPTS[2], GREEDY, lora_request=loras[1])
        assert other.num_cached_tokens == 0 and shared.num_cached_tokens == 0
        assert llm.executor.scheduler.stats()["used_blocks"] == 0


def test_bad_adapters_are_refused_in_one_line(setup, tmp_path):
    base, adapters, engine, loras = setup
    with LLM(engine, enable_lora=True, max_loras=2, max_lora_rank=8) as llm:
        with pytest.raises(TrtcError, match="rank 16, above --max_lora_rank 8"):
            llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=loras[2])
        with pytest.raises(TrtcError, match="no adapter_config.json"):
            llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("x", 9, str(tmp_path / "none")))
        other = make_hf_model(tmp_path / "other", "llama3_gqa", hidden_size=32, intermediate_size=48)
        wrong = make_adapter(other, tmp_path / "wrong", 4, 4)
        with pytest.raises(TrtcError, match="another base model"):
            llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("w", 10, str(wrong)))
        cfg = json.loads((adapters[0] / "adapter_config.json").read_text())
        assert cfg["r"] == 8
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text("{not json")
        (broken / "adapter_model.safetensors").write_bytes(b"\0" * 16)
        with pytest.raises(TrtcError, match="adapter_config.json is not a PEFT LoRA config"):
            llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("b", 11, str(broken)))
        (broken / "adapter_config.json").write_text(json.dumps(cfg))
        with pytest.raises(TrtcError, match="cannot be read"):
            llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=LoRARequest("b2", 12, str(broken)))
        assert llm.generate(PROMPTS[0], GREEDY, lora_request=loras[0]).token_ids  # the engine goes on
    with LLM(engine) as llm, pytest.raises(TrtcError, match="max_loras"):
        llm.executor.add_request(PROMPTS[0], GREEDY, lora_request=loras[0])


def test_server_serves_adapters_by_model_name(setup, tmp_path):
    """`trtc serve --lora_modules a0=... a1=...`: the `model` field picks the adapter (the offline engine's
    tokens with it), /v1/models lists them under the base, adapters load and unload at run time, and a
    bad one is a 400 that loads nothing."""
    import httpx2 as httpx
    from openai import NotFoundError, OpenAI
    from serve_helpers import Server

    base, adapters, engine, loras = setup
    s = Server(engine, "--lora_modules", f"adapter0={adapters[0]}", "--lora_modules", f"adapter1={adapters[1]}",
               "--max_loras", "2")
    try:
        client = OpenAI(base_url=s.url + "/v1", api_key="none")
        assert [(m.id, getattr(m, "parent", None)) for m in client.models.list().data] == [
            ("test-model", None), ("adapter0", "test-model"), ("adapter1", "test-model")]
        texts = {m: client.completions.create(model=m, prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                              extra_body={"ignore_eos": True}).choices[0].text
                 for m in ("test-model", "adapter0", "adapter1")}
        assert len(set(texts.values())) == 3
        with LLM(engine, enable_lora=True, max_loras=4, max_lora_rank=16) as llm:
            for m, lr in (("test-model", None), ("adapter0", loras[0]), ("adapter1", loras[1])):
                assert texts[m] == llm.generate(PROMPTS[3], GREEDY, lora_request=lr).text, m
        with pytest.raises(NotFoundError):
            client.completions.create(model="adapter2", prompt=PROMPTS[3], max_tokens=4)
        r = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "adapter2", "lora_path": str(adapters[2])})
        assert r.status_code == 200, r.text
        with LLM(engine, enable_lora=True, max_loras=4, max_lora_rank=16) as llm:
            want2 = llm.generate(PROMPTS[3], GREEDY, lora_request=loras[2]).text
        got2 = client.completions.create(model="adapter2", prompt=PROMPTS[3], max_tokens=12, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
        assert got2 == want2  # three adapters through two slots
        bad = httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
        assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
        assert httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "adapter2"}).status_code == 200
        assert httpx.post(s.url + "/v1/unload_lora_adapter", json={"lora_name": "adapter2"}).status_code == 404
        assert [m.id for m in client.models.list().data] == ["test-model", "adapter0", "adapter1"]
    finally:
        s.stop()


def test_trtc_run_lora_dir_and_bad_flags(setup, tmp_path):
    from cli_helpers import assert_one_line_error, cli

    _, adapters, engine, loras = setup
    text = text_of(PROMPTS[4])
    with LLM(engine, enable_lora=True, max_loras=1, max_lora_rank=16) as llm:
        want = llm.generate(text, GREEDY, lora_request=loras[0]).token_ids
        base = llm.generate(text, GREEDY).token_ids
    assert want != base
    out = tmp_path / "run.json"
    r = cli("run", "--engine_dir", engine, "--input_text", text, "--max_output_len", 12, "--end_id", -1,
            "--lora_dir", adapters[0], "--output_json", out)
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())[0]["output_ids"] == want
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "w1", "--lora_dir", tmp_path),
                          "--lora_dir", "adapter_config.json")
    assert_one_line_error(cli("serve", engine, "--device", "cpu", "--lora_modules", "noequals"), "NAME=PATH")

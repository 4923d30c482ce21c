"""EleutherAI's lm-evaluation-harness scoring through `trtc serve`: its `local-completions` model
(echo + logprobs 1 + max_tokens 1, token-id prompts, a local Hugging Face tokenizer) on a small
local `loglikelihood_rolling` task over passages of the fixture books, against a real server
process (stories260K on the CPU); every passage's log-likelihood equals HF's, computed here over the
same rolling windows, to 1e-3, and so do the task's bits_per_byte and word_perplexity."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import FIXTURES
from serve_helpers import Server, stories260k

lm_eval = pytest.importorskip("lm_eval")
MAX_LENGTH = 128  # lm-eval's max_length: rolling windows of 126 tokens, so long passages take several


def passages(n: int = 6) -> list[str]:
    path = FIXTURES / "text" / "alice_in_wonderland.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    paras = [re.sub(r"\s+", " ", p).strip() for p in path.read_text().split("\n\n")]
    paras = [p for p in paras if len(p) > 200]
    return [p[:1200] for p in paras[10 : 10 + n]]


def task_dir(tmp_path, texts: list[str]):
    data = tmp_path / "passages.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "trtc_passages.yaml").write_text(
        "task: trtc_passages\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return tmp_path


def hf_rolling_loglikelihood(model, tokenizer, text: str) -> float:
    """lm-eval's rolling windows (BOS prefix, disjoint windows of MAX_LENGTH - 2 tokens) scored by HF."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = tokenizer.encode(text, add_special_tokens=False)
    total = 0.0
    for context, target in map(make_disjoint_window, get_rolling_token_windows(
            ids, prefix_token=tokenizer.bos_token_id, max_seq_len=MAX_LENGTH - 2, context_len=1)):
        seq = context + target
        with torch.no_grad():
            lp = model(torch.tensor([seq])).logits[0].double().log_softmax(-1)  # [len, vocab]
        rows = torch.arange(len(context) - 1, len(seq) - 1)
        total += float(lp[rows, torch.tensor(target)].sum())
    return total


def test_lm_eval_local_completions_equal_hf(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = stories260k()
    texts = passages()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    server = Server(model_dir)
    try:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"model": "test-model", "base_url": server.url + "/v1/completions",
                        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir), "max_length": MAX_LENGTH,
                        "num_concurrent": 1, "max_retries": 1},
            tasks=["trtc_passages"], task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir(tmp_path, texts))),
            log_samples=True,
        )
    finally:
        assert server.stop() == 0, server.output()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    samples = sorted(results["samples"]["trtc_passages"], key=lambda s: s["doc_id"])
    assert len(samples) == len(texts)
    want = [hf_rolling_loglikelihood(model, tokenizer, t) for t in texts]
    assert sum(len(tokenizer.encode(t, add_special_tokens=False)) > MAX_LENGTH for t in texts) >= 3
    got = [float(s["filtered_resps"][0]) if isinstance(s["filtered_resps"], list) else float(s["filtered_resps"])
           for s in samples]
    for g, w in zip(got, want):
        assert g < 0 and abs(g - w) < 1e-3, (g, w)
    metrics = results["results"]["trtc_passages"]
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert abs(metrics["word_perplexity,none"] - math.exp(-sum(want) / words)) < 1e-3 * math.exp(-sum(want) / words)
    assert abs(metrics["bits_per_byte,none"] - (-sum(want) / n_bytes / math.log(2))) < 1e-3

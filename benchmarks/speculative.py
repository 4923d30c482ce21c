"""Speculative decoding (n-gram prompt lookup) against none, on a real model, same run, same prompts.

    python benchmarks/speculative.py [MODEL_DIR] [--max_draft_len 2,4,8] [--osl 128] [--batch 1,4]
        [--draft_layers 2] [--device cpu|cuda] [--output_json F]

MODEL_DIR (default: the books-16M fixture, a model trained on public-domain books) is built once. Two
workloads of greedy requests, each at every --batch (that many requests in flight, each its own text):
- `repeat`: a held-out passage given twice, then its first words again (a model that has learned to
  copy continues the passage: the case prompt lookup is made for, as in summarising or editing a
  document it was given);
- `plain`: a held-out passage alone, continued freely.
Modes: ngram at each --max_draft_len, and draft_target at 4 with a draft made from MODEL_DIR's first
--draft_layers layers (its embedding, final norm and LM head kept: the same vocabulary). Prints output
tokens/s, engine steps, tokens per target step and the mean acceptance length of each setting beside
no speculation. Greedy outputs are checked equal to no speculation's. Not a test: the
numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

from trtc import LLM, SamplingParams, SpeculativeConfig  # noqa: E402
from trtc.compiler.build import build_from_hf  # noqa: E402
from trtc.formats.build_config import BuildConfig  # noqa: E402


def passages(n: int, words: int = 120) -> list[str]:
    """n passages of `words` words from a held-out book."""
    text = (FIXTURES / "text" / "adventures_of_sherlock_holmes.txt").read_text().split()
    start = 2000
    return [" ".join(text[start + i * words : start + (i + 1) * words]) for i in range(n)]


def workloads(n: int) -> dict[str, list[str]]:
    ps = passages(n)
    return {"repeat": [f"{p}\n\n{p}\n\n{' '.join(p.split()[:12])}" for p in ps], "plain": ps}


def truncated_draft(model: Path, layers: int, out: Path) -> Path:
    """MODEL_DIR's first `layers` decoder layers as an HF model (a draft of the same vocabulary)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    hf.model.layers = hf.model.layers[:layers]
    hf.config.num_hidden_layers = layers
    hf.save_pretrained(out)
    return out


def run(engine: Path, prompts: list[str], osl: int, spec: SpeculativeConfig | None, device: str | None) -> dict:
    params = SamplingParams(max_tokens=osl, end_id=-1)
    with LLM(engine, speculative_config=spec, device=device) as llm:
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, end_id=-1))  # warm-up
        steps0 = llm.executor.step_counts()[0]
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        steps = llm.executor.step_counts()[0] - steps0
        stats = llm.executor.spec_stats
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": [o.token_ids for o in outs], "seconds": seconds, "output_tokens_per_s": tokens / seconds,
            "steps": steps, "tokens_per_step": tokens / steps,
            "acceptance_length": stats.mean_acceptance_length if spec else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=FIXTURES / "books-16M")
    ap.add_argument("--max_draft_len", default="2,4,8")
    ap.add_argument("--osl", type=int, default=128)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--draft_layers", type=int, default=2, help="draft_target: the draft's layers (0: skip the mode)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--output_json", type=Path, default=None)
    a = ap.parse_args()
    if not a.model.is_dir():
        raise SystemExit(f"{a.model} is absent: pass an HF model directory")
    ks = [int(k) for k in a.max_draft_len.split(",")]
    batches = [int(b) for b in a.batch.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="trtc-spec-bench-") as work:
        bc = BuildConfig(max_batch_size=max(batches), max_seq_len=1024)
        engine = build_from_hf(a.model, Path(work) / "engine", build_config=bc, progress=False)
        configs = [(f"ngram {k}", SpeculativeConfig(max_draft_len=k)) for k in ks]
        if a.draft_layers:
            draft = build_from_hf(truncated_draft(a.model, a.draft_layers, Path(work) / "draft"), Path(work) / "draft_engine",
                                  build_config=bc, progress=False)
            configs.append((f"draft {a.draft_layers}L 4", SpeculativeConfig("draft_target", 4, draft_engine_dir=str(draft))))
        for name, prompts_all in workloads(max(batches)).items():
            for b in batches:
                prompts = prompts_all[:b]
                base = run(engine, prompts, a.osl, None, a.device)
                rows.append({"workload": name, "batch": b, "setting": "none", **base})
                for label, config in configs:
                    r = run(engine, prompts, a.osl, config, a.device)
                    if r["tokens"] != base["tokens"]:
                        raise SystemExit(f"{name}, batch {b}, {label}: greedy output differs from no speculation")
                    rows.append({"workload": name, "batch": b, "setting": label, **r,
                                 "speedup": r["output_tokens_per_s"] / base["output_tokens_per_s"]})
    print(f"\n{a.model.name}, greedy, OSL {a.osl}, device {a.device or 'default'}; setting: mode and max_draft_len")
    print(f"{'workload':<8} {'batch':>5} {'setting':>13} {'tok/s':>8} {'speedup':>7} {'steps':>6} {'tok/step':>8} "
          f"{'accept len':>10}")
    for r in rows:
        print(f"{r['workload']:<8} {r['batch']:>5} {r['setting']:>13} {r['output_tokens_per_s']:>8.1f} "
              f"{r.get('speedup', 1.0):>6.2f}x {r['steps']:>6} {r['tokens_per_step']:>8.2f} "
              f"{r['acceptance_length'] or 1.0:>10.2f}")
    if a.output_json:
        a.output_json.write_text(json.dumps([{k: v for k, v in r.items() if k != "tokens"} for r in rows], indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""The cost of LoRA per token: a batch of requests with no adapter, one adapter for all, and N distinct
adapters, against the base engine in the same run.

    python benchmarks/lora.py [MODEL_DIR] [--num_requests 64] [--isl 128] [--osl 64] [--rank 16]
        [--adapters 1,8] [--device cpu|cuda] [--output_json F]

MODEL_DIR (default: the books-16M fixture) is built once; the adapters are PEFT LoRA adapters of
--rank on every linear (q, k, v, o, gate, up, down) with random A and B (their values do not change
the cost). Every request is greedy with exactly OSL new tokens. Prints output tokens/s of each setting
and its ratio to the base engine. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"

from trtc import LLM, LoRARequest, SamplingParams  # noqa: E402
from trtc.compiler.build import build_from_hf  # noqa: E402
from trtc.formats.build_config import BuildConfig  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model: Path, n: int, rank: int, work: Path) -> list[LoRARequest]:
    import peft
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        peft.get_peft_model(base, cfg).save_pretrained(work / f"adapter{i}")
        out.append(LoRARequest(f"adapter{i}", i + 1, str(work / f"adapter{i}")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=FIXTURES / "books-16M")
    ap.add_argument("--num_requests", type=int, default=64)
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", default="1,8")
    ap.add_argument("--device", default=None)
    ap.add_argument("--output_json", type=Path, default=None)
    a = ap.parse_args()
    if not a.model.is_dir():
        raise SystemExit(f"{a.model} is absent: pass an HF model directory")
    counts = [int(c) for c in a.adapters.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 8000, (a.num_requests, a.isl), generator=g).tolist()
    params = SamplingParams(max_tokens=a.osl, end_id=-1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="trtc-lora-bench-") as work:
        work = Path(work)
        engine = build_from_hf(a.model, work / "engine", build_config=BuildConfig(max_batch_size=a.num_requests,
                               max_seq_len=a.isl + a.osl + 8), progress=False)
        adapters = make_adapters(a.model, max(counts), a.rank, work)
        with LLM(engine, device=a.device, enable_lora=True, max_loras=max(counts), max_lora_rank=a.rank,
                 enable_prefix_reuse=False) as llm:
            for label, loras in [("base engine, no adapter", [None] * a.num_requests),
                                 *((f"{n} adapter{'s' if n > 1 else ''}", [adapters[i % n] for i in range(a.num_requests)])
                                   for n in counts)]:
                llm.generate(prompts[:2], SamplingParams(max_tokens=4, end_id=-1), lora_request=loras[:2])  # warm-up
                start = time.perf_counter()
                outs = llm.generate(prompts, params, lora_request=loras)
                seconds = time.perf_counter() - start
                assert all(len(o.token_ids) == a.osl for o in outs)
                rows.append({"setting": label, "seconds": seconds, "output_tokens_per_s": a.num_requests * a.osl / seconds})
    print(f"\n{a.model.name}, {a.num_requests} requests of ISL/OSL {a.isl}/{a.osl} in flight, LoRA rank {a.rank} "
          f"on every linear, device {a.device or 'default'}")
    print(f"{'setting':<26} {'output tok/s':>12} {'vs base':>8}")
    for r in rows:
        print(f"{r['setting']:<26} {r['output_tokens_per_s']:>12,.1f} {r['output_tokens_per_s'] / rows[0]['output_tokens_per_s']:>7.2f}x")
    if a.output_json:
        a.output_json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

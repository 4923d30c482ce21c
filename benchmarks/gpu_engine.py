"""The GPU engines (bf16, FP8, INT4-AWQ) against HF transformers on the same GPU, in one run.

    python benchmarks/gpu_engine.py [--model llama-8b|gemma2-9b|qwen3-30b-a3b|mixtral-8x7b] [--num_layers N]
        [--work_dir DIR] [--quick] [--skip_compile] [--skip_long] [--engines bf16,fp8,int4_awq]

Creates a random-weight HF checkpoint of Llama-3.1-8B shape (or --model's) from a config (no download), builds a
bf16 engine (timed, autotuning included), loads it (timed), runs `trtc bench` in throughput mode
(ISL/OSL 128/128, 128/2048, 2048/128) and latency mode (batch 1), runs HF transformers on the same
GPU and prompts with its fastest settings (static cache + torch.compile at batch 1; static batches
for throughput), and prints one table: trtc, HF, ratio, and trtc against the hardware limit.
FP8 (W8A8 + FP8 KV cache) and INT4-AWQ (W4A16, group 128) engines of the same shapes are built from
round-to-nearest quantized checkpoints (benchmarks/synthetic_quant.py: speed only) and measured
at 128/128 and batch 1 beside bf16.
--quick uses a ~1B model and fewer requests (a smoke test of the whole path).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

LLAMA_8B = dict(
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000,
    eos_token_id=128001,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
)
# The shapes of published models (their config.json's fields), random weights.
MODELS = {
    "llama-8b": LLAMA_8B,
    "llama-1b": {**LLAMA_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 16, "num_key_value_heads": 4},
    "gemma2-9b": dict(
        model_type="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True, architectures=["Gemma2ForCausalLM"],
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=151643,
        eos_token_id=151645, tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"],
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, architectures=["MixtralForCausalLM"],
    ),
}


def make_checkpoint(path: Path, shape: dict) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return 0
    config = AutoConfig.for_model(**shape)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    for p in model.parameters():
        p.data.normal_(0, 0.02, generator=g)
    model.save_pretrained(path, max_shard_size="5GB")
    n = sum(p.numel() for p in model.parameters())
    del model, p
    gc.collect()  # the model's reference cycles hold its 16 GB until collected
    torch.cuda.empty_cache()
    return n


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def hf_batch1(hf_dir: Path, isl: int, osl: int, compile_: bool) -> float:
    """HF tokens/s at batch 1: eager with its default (dynamic) cache, or a static cache, which
    transformers' generate compiles with torch.compile itself. Warm-up runs use the same lengths
    as the timed run, so nothing is compiled while it is timed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(100, model.config.vocab_size, (1, isl), device="cuda")
    kw = dict(max_new_tokens=osl, min_new_tokens=osl, do_sample=False, pad_token_id=0)
    if compile_:
        kw["cache_implementation"] = "static"
    for _ in range(3 if compile_ else 1):
        model.generate(ids, **kw)
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return osl / seconds


def hf_static_batch(hf_dir: Path, batch: int, isl: int, osl: int) -> float:
    """HF output tokens/s generating one static batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(100, model.config.vocab_size, (batch, isl), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids[:, :16], max_new_tokens=4, **{**kw, "attention_mask": torch.ones_like(ids[:, :16])})
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=osl, min_new_tokens=osl, **kw)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return batch * osl / seconds


def hf_batch1_guarded(hf_dir: Path, isl: int, osl: int, timeout: int) -> tuple[float, str]:
    """HF batch-1 tokens/s with torch.compile in a subprocess bounded by `timeout` seconds (compiling
    an 8B model can take minutes); falls back to the static cache without compile."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import gpu_engine as g; " \
           f"print(g.hf_batch1(g.Path({str(hf_dir)!r}), {isl}, {osl}, True))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, check=True)
        return float(out.stdout.split()[-1]), "static cache + torch.compile"
    except (subprocess.TimeoutExpired, subprocess.CalledProcessError, ValueError, IndexError) as e:
        err = getattr(e, "stderr", "") or ""
        print(f"HF compiled run failed or timed out ({type(e).__name__}): {err[-600:]}")
        return float("nan"), "static cache + compile failed"


BUILD_FLAGS = ["--max_seq_len", "4096", "--max_batch_size", "256", "--max_num_tokens", "8192", "--overwrite"]


def build_engine(kind: str, hf_dir: Path, engine: Path, flags: list[str] = BUILD_FLAGS) -> float:
    """Seconds to build `kind` (bf16 from the HF dir; fp8 / int4_awq from a synthetic quantized
    checkpoint, whose preparation is not counted) with the build `flags`."""
    cli = [sys.executable, "-m", "trtc.cli"]
    if kind == "bf16":
        return timed([*cli, "build", "--model_dir", str(hf_dir), "--output_dir", str(engine), *flags])
    ckpt, qckpt = engine.parent / "ckpt", engine.parent / f"ckpt-{kind}"
    if not (ckpt / "config.json").is_file():
        subprocess.run([*cli, "convert", "--model_dir", str(hf_dir), "--output_dir", str(ckpt), "--dtype", "bfloat16"],
                       check=True)
    extra = ["--kv_cache_fp8"] if kind == "fp8" else []
    subprocess.run([sys.executable, str(Path(__file__).parent / "synthetic_quant.py"), str(ckpt), str(qckpt), kind, *extra],
                   check=True)
    kv = ["--kv_cache_dtype", "fp8"] if kind == "fp8" else []
    seconds = timed([*cli, "build", "--checkpoint_dir", str(qckpt), "--output_dir", str(engine), *flags, *kv])
    shutil.rmtree(qckpt)
    return seconds


def trtc_part(args, hf_dir: Path, engine: Path, kind: str = "bf16") -> dict:
    """Build, load and bench the engine; the figures go to results.json for the HF part."""
    from trtc.runtime.executor import Executor
    from trtc.tools.bench import bench, format_result

    build_s = build_engine(kind, hf_dir, engine)
    free, total = torch.cuda.mem_get_info()
    print(f"before load: allocated {torch.cuda.memory_allocated() / 1e9:.1f} GB, free {free / 1e9:.1f} of {total / 1e9:.1f} GB")
    ex = Executor(engine, free_gpu_memory_fraction=args.kv_fraction)
    print(f"{kind}: weights {ex.runner.weight_bytes() / 1e9:.2f} GB, KV pool {ex.runner.kv_cache_bytes() / 1e9:.1f} GB "
          f"({ex.num_blocks} blocks), allocated {torch.cuda.memory_allocated() / 1e9:.1f} GB; {ex.worker.memory_line()}",
          flush=True)
    torch.cuda.reset_peak_memory_stats()
    res = {"build_s": build_s, "load_s": ex.load_seconds, "tput": {}}
    lat = bench(ex, 128, 256, latency=True, batch_size=1)
    print(format_result(lat), flush=True)
    res["latency"] = lat.to_dict()
    requests = 128 if args.quick else 512
    shapes = [(128, 128)] if args.skip_long or kind != "bf16" else [(128, 128), (128, 2048), (2048, 128)]
    for isl, osl in shapes:
        r = bench(ex, isl, osl, requests if osl <= 128 else requests // 4, concurrency=256)
        print(format_result(r), flush=True)
        print(peak_vs_plan(ex), flush=True)
        res["tput"][f"{isl}/{osl}"] = r.output_tokens_per_s
    ex.close()
    shutil.rmtree(engine)  # the disk holds one 8B engine at a time beside the checkpoints
    return res


def peak_vs_plan(ex) -> str:
    """Peak allocated since load against the plan (weights + KV pool + what the pool left for the steps)."""
    peak, plan = torch.cuda.max_memory_allocated(), ex.worker.memory_budget()
    return (f"peak allocated {peak / 2**30:.2f} GiB vs plan {plan / 2**30:.2f} GiB "
            f"({'within' if peak <= plan else 'OVER'} the plan); reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB")


def hf_part(args, hf_dir: Path) -> dict:
    eager = hf_batch1(hf_dir, 128, 256, compile_=False)
    compiled = float("nan") if args.skip_compile else hf_batch1_guarded(hf_dir, 128, 256, timeout=240)[0]
    best = eager if compiled != compiled else max(eager, compiled)  # nan: compile failed or skipped
    how = f"eager {eager:.1f}, static cache + compile {compiled:.1f}"
    static = {} if args.skip_hf_static else {b: hf_static_batch(hf_dir, b, 128, 128) for b in (64, 256)}
    return {"batch1": best, "batch1_how": how, "static": static}


def table(t: dict, hf: dict, quant: dict) -> None:
    lat = t["latency"]
    trtc_b1 = 1e3 / lat["tpot_ms"]["mean"]
    limit_b1 = lat["bandwidth_gbps"] * 1e9 / lat["bytes_per_step"]
    hf_tput = max(hf["static"].values(), default=float("nan"))
    rows = [
        ("build (s)", f"{t['build_s']:.1f}", "", "", "target < 120"),
        ("engine load (s)", f"{t['load_s']:.1f}", "", "", "target < 20"),
        ("batch-1 decode tok/s", f"{trtc_b1:.1f}", f"{hf['batch1']:.1f}", f"{trtc_b1 / hf['batch1']:.2f}x",
         f"MBU {100 * lat['mbu']:.1f}% of {lat['bandwidth_gbps']:,.0f} GB/s (limit {limit_b1:.0f} tok/s); HF: {hf['batch1_how']}"),
        ("tput 128/128 tok/s", f"{t['tput']['128/128']:,.0f}", f"{hf_tput:,.0f}", f"{t['tput']['128/128'] / hf_tput:.2f}x",
         "HF static batch " + ", ".join(f"{b}: {v:,.0f}" for b, v in hf["static"].items())),
    ]
    rows += [(f"tput {k} tok/s", f"{v:,.0f}", "", "", "concurrency 256") for k, v in t["tput"].items() if k != "128/128"]
    for kind, q in quant.items():
        qlat = q["latency"]
        q_b1 = 1e3 / qlat["tpot_ms"]["mean"]
        rows += [
            (f"{kind} build (s)", f"{q['build_s']:.1f}", "", "", "autotuning included"),
            (f"{kind} batch-1 tok/s", f"{q_b1:.1f}", f"{hf['batch1']:.1f}", f"{q_b1 / hf['batch1']:.2f}x",
             f"{q_b1 / trtc_b1:.2f}x trtc bf16; MBU {100 * qlat['mbu']:.1f}% ({qlat['bytes_per_step'] / 1e9:.2f} GB/step)"),
            (f"{kind} tput 128/128", f"{q['tput']['128/128']:,.0f}", f"{hf_tput:,.0f}", f"{q['tput']['128/128'] / hf_tput:.2f}x",
             f"{q['tput']['128/128'] / t['tput']['128/128']:.2f}x trtc bf16"),
        ]
    print()
    print(f"{'metric':<24}{'trtc':>12}{'HF':>12}{'ratio':>8}  vs hardware / note")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>12}{r[2]:>12}{r[3]:>8}  {r[4]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work_dir", default=None, help="[default: /tmp/trtc-gpu-bench-MODEL-LAYERS]")
    ap.add_argument("--quick", action="store_true", help="--model llama-1b and fewer requests")
    ap.add_argument("--model", choices=list(MODELS), default="llama-8b", help="the shape of the random checkpoint")
    ap.add_argument("--num_layers", type=int, default=None, help="fewer layers than the model has (to fit the disk)")
    ap.add_argument("--skip_compile", action="store_true", help="HF batch 1 without torch.compile")
    ap.add_argument("--skip_long", action="store_true", help="only ISL/OSL 128/128 in throughput mode")
    ap.add_argument("--skip_hf_static", action="store_true", help="HF at batch 1 only (no static-batch throughput)")
    ap.add_argument("--kv_fraction", type=float, default=0.7, help="free_gpu_memory_fraction of the KV pool")
    ap.add_argument("--engines", default="bf16", help="comma-separated: bf16 (always), fp8, int4_awq")
    ap.add_argument("--kind", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--part", choices=["all", "trtc", "hf", "engine"], default="all",
                    help="run trtc and HF in separate calls (trtc writes results.json in work_dir)")
    args = ap.parse_args()
    if args.quick:
        args.model = "llama-1b"
    shape = {**MODELS[args.model], **({"num_hidden_layers": args.num_layers} if args.num_layers else {})}
    work = Path(args.work_dir or f"/tmp/trtc-gpu-bench-{args.model}-{shape['num_hidden_layers']}")
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, engine, results = work / "hf", work / "engine", work / "results.json"

    start = time.perf_counter()
    n = make_checkpoint(hf_dir, shape)
    weight_gb = sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")) / 1e9
    print(f"checkpoint: {n / 1e9:.2f}B parameters, {weight_gb:.2f} GB, ready in {time.perf_counter() - start:.0f} s", flush=True)
    if args.part == "engine":  # one engine in this process (the others each in their own)
        (work / f"results-{args.kind}.json").unlink(missing_ok=True)
        out = trtc_part(args, hf_dir, engine if args.kind == "bf16" else work / f"engine-{args.kind}", args.kind)
        (work / f"results-{args.kind}.json").write_text(json.dumps(out))
        return
    if args.part in ("all", "trtc"):
        for kind in dict.fromkeys(["bf16", *args.engines.split(",")]):  # a fresh process each: all memory back
            subprocess.run([sys.executable, __file__, "--part", "engine", "--kind", kind, "--work_dir", str(work),
                            "--kv_fraction", str(args.kv_fraction), "--model", args.model, *(["--quick"] if args.quick else []),
                            *(["--skip_long"] if args.skip_long else [])])
            if not (work / f"results-{kind}.json").is_file():
                raise SystemExit(f"the {kind} engine run failed")
        res = json.loads((work / "results-bf16.json").read_text())
        res["quant"] = {kind: json.loads((work / f"results-{kind}.json").read_text())
                        for kind in args.engines.split(",") if kind != "bf16"}
        shutil.rmtree(work / "ckpt", ignore_errors=True)
        results.write_text(json.dumps(res))
    if args.part in ("all", "hf"):
        res = json.loads(results.read_text())
        table(res, hf_part(args, hf_dir), res.get("quant", {}))


if __name__ == "__main__":
    main()

"""The report `trtc quantize` ends with: perplexity of the unquantized and the quantized model on an
eval text, and greedy-token agreement over a few prompts, both measured through trtc engines built
from the two checkpoints (so it is what users will run). Printed, and saved as quant_report.json."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from trtc.compiler.build import build, build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig
from trtc.quantization.calibration import read_texts
from trtc.runtime.executor import Executor
from trtc.runtime.sampling_params import SamplingParams
from trtc.tools.perplexity import perplexity

EVAL_TOKENS = 8192  # scored tokens at most: enough to rank formats, quick on a CPU
MIN_HELD_OUT = 1024  # fewer held-out calibration tokens than this: score the calibration text's tail
NUM_PROMPTS, PROMPT_LEN, NEW_TOKENS = 4, 16, 32


def eval_tokens(tokenizer, eval_dataset, calib_dataset, calibration_token_count: int) -> tuple[list[int], str]:
    """The eval text's tokens: --eval_dataset, else the calibration text after what calibration used."""
    if eval_dataset:
        texts = read_texts(eval_dataset, "--eval_dataset")
        return [t for text in texts for t in tokenizer(text, add_special_tokens=False).input_ids], \
            ", ".join(Path(p).name for p in eval_dataset)
    ids = [t for text in read_texts(calib_dataset) for t in tokenizer(text, add_special_tokens=False).input_ids]
    names = ", ".join(Path(p).name for p in calib_dataset)
    if len(ids) - calibration_token_count >= MIN_HELD_OUT:
        return ids[calibration_token_count:], f"{names} after the {calibration_token_count} calibration tokens (held out)"
    tail = ids[-max(MIN_HELD_OUT, len(ids) // 10):]
    return tail, f"the last {len(tail)} tokens of {names} (not held out: calibration used the whole text)"


def quant_report(model_dir: Path, ckpt_dir: Path, tokenizer, eval_dataset, calib_dataset) -> dict:
    """Compare the checkpoint `trtc quantize` wrote in ckpt_dir with the HF model it came from."""
    config = CheckpointConfig.load(ckpt_dir)
    graph, quant = config.graph, config.quantization or {}
    used = (quant.get("calibration") or {}).get("tokens", 0)
    ids, source = eval_tokens(tokenizer, eval_dataset, calib_dataset, used)
    window = min(512, graph.max_position_embeddings - 1)
    prompts = [([graph.bos_token_id] if graph.bos_token_id is not None else []) + ids[i * 997 : i * 997 + PROMPT_LEN]
               for i in range(NUM_PROMPTS)]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, end_id=-1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="trtc-report-") as tmp:
        engines = {
            "unquantized": build_from_hf(model_dir, Path(tmp) / "base", dtype=config.dtype, progress=False),
            "quantized": build(ckpt_dir, Path(tmp) / "quant", BuildConfig(), progress=False),
        }
        for name, engine in engines.items():
            ex = Executor(engine, enable_prefix_reuse=False)
            ppl = perplexity(ex, ids, window, graph.bos_token_id, EVAL_TOKENS)
            outs = {}
            for p in prompts:
                rid = ex.add_request(p, greedy)
                outs[rid] = []
                ex.requests[rid].on_event = lambda e, out=outs[rid]: out.append(e.token_id)
            ex.run_until_complete()
            results[name] = {"perplexity": ppl.perplexity, "num_tokens": ppl.tokens, "greedy": list(outs.values())}
            ex.close()
    base, q = results["unquantized"], results["quantized"]
    same = sum(a == b for x, y in zip(base["greedy"], q["greedy"]) for a, b in zip(x, y))
    report = {
        "quant_algo": quant.get("quant_algo"),
        "kv_cache_quant_algo": quant.get("kv_cache_quant_algo"),
        "eval_text": source,
        "window_len": window,
        "perplexity": {"unquantized": base["perplexity"], "quantized": q["perplexity"],
                       "increase": q["perplexity"] / base["perplexity"] - 1, "num_tokens": q["num_tokens"]},
        "greedy_agreement": same / (NUM_PROMPTS * NEW_TOKENS),
        "greedy_prompts": NUM_PROMPTS,
        "greedy_new_tokens": NEW_TOKENS,
    }
    (Path(ckpt_dir) / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
    p = report["perplexity"]
    click.echo(f"quantization report ({report['quant_algo']}{' + FP8 KV' if report['kv_cache_quant_algo'] else ''}), "
               f"eval text: {source}")
    click.echo(f"  perplexity   unquantized {p['unquantized']:.3f}   quantized {p['quantized']:.3f}   "
               f"({100 * p['increase']:+.2f}%, {p['num_tokens']} tokens)")
    click.echo(f"  greedy-token agreement  {100 * report['greedy_agreement']:.1f}% "
               f"({NUM_PROMPTS} prompts x {NEW_TOKENS} tokens)")
    return report

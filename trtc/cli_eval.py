"""`trtc eval`: perplexity of an engine on plain-text files, through the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trtc.errors import TrtcError
from trtc.utils.paths import check_output_file

DEFAULT_WINDOW_LEN = 512  # the fixture README's protocol


def eval_engine(engine_dir: str, datasets: list[str], max_tokens: int | None, window_len: int | None,
                output_json: str | None, kv_cache_free_gpu_memory_fraction: float,
                kv_cache_max_tokens: int | None = None, progress: bool | None = None) -> list[dict]:
    from trtc.llm import load_tokenizer
    from trtc.quantization.calibration import read_texts
    from trtc.runtime.executor import Executor
    from trtc.tools.perplexity import check_window_len, perplexity

    texts = read_texts(datasets, "--dataset")
    if max_tokens is not None and max_tokens < 1:
        raise TrtcError(f"--max_tokens must be positive, got {max_tokens}")
    check_output_file(output_json, "--output_json")
    executor = Executor(engine_dir, kv_cache_max_tokens=kv_cache_max_tokens,
                        free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction)
    try:
        max_seq_len = executor.engine.build_config.max_seq_len
        if window_len is None:  # the protocol's 512 where the engine takes it
            window_len = min(DEFAULT_WINDOW_LEN, max_seq_len - 1)
        check_window_len(window_len, max_seq_len)
        tokenizer = load_tokenizer(Path(engine_dir))
        bos = executor.engine.graph.bos_token_id
        quant = executor.engine.pretrained.quantization or {}
        label = quant.get("quant_algo") or executor.engine.pretrained.dtype
        if executor.engine.build_config.kv_cache_dtype == "fp8":
            label += " + FP8 KV"
        click.echo(f"{'dataset':40s} {'tokens':>8s} {'perplexity':>11s}   ({label}, windows of {window_len} from BOS)")
        results = []
        for path, text in zip(datasets, texts):
            ids = tokenizer(text, add_special_tokens=False).input_ids
            r = perplexity(executor, ids, window_len, bos, max_tokens, progress=progress, desc=Path(path).name)
            click.echo(f"{Path(path).name:40s} {r.tokens:8d} {r.perplexity:11.3f}")
            results.append({"dataset": str(path), "num_tokens": r.tokens, "nll": r.nll, "perplexity": r.perplexity,
                            "window_len": window_len, "bos": bos is not None, "engine": str(engine_dir),
                            "quantization": label})
    finally:
        executor.close()
    if output_json is not None:
        Path(output_json).write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return results

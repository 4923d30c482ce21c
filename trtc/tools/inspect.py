"""`trtc inspect ENGINE_OR_CKPT [--json]`: what an engine or checkpoint directory holds, for
pipeline logs and checks: architecture, parameters, dtype, quantization, tp, build limits, target,
tactics, build id, memory plan, file sizes. Reads config.json and file sizes only (no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtc.errors import TrtcError
from trtc.formats.checkpoint import CHECKPOINT_FORMAT, CheckpointConfig
from trtc.formats.engine import ENGINE_FORMAT, Engine
from trtc.utils.config_json import read_config_json

FIX = "pass an engine directory (`trtc build`) or a checkpoint directory (`trtc convert`, `trtc quantize`)"


def inspect_dir(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    d = read_config_json(path, "directory", FIX)
    fmt = d.get("format")
    if fmt == ENGINE_FORMAT:
        engine = Engine.load(path)  # version checks: one line
        out = {"kind": "engine", **_model(engine.pretrained), "backend": engine.backend,
               "trtc_version": d.get("trtc_version"), "build_config": engine.build_config.to_dict(),
               "target": engine.target, "tactics": _tactics(engine), "build_id": engine.build_id}
        for key in ("memory_plan", "build_flags"):
            if key in d:
                out[key] = d[key]
    elif fmt == CHECKPOINT_FORMAT:
        out = {"kind": "checkpoint", **_model(CheckpointConfig.load(path)), "trtc_version": d.get("trtc_version")}
    else:
        raise TrtcError(f"{path} is neither a trtc engine nor a trtc checkpoint (config.json format {fmt!r}); {FIX}")
    out["path"] = str(path)
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    out["files"] = files
    out["total_bytes"] = sum(files.values())
    return out


def _model(ckpt: CheckpointConfig) -> dict[str, Any]:
    g = ckpt.graph
    params = sum(_numel(s) for s in g.weight_shapes(None).values())
    a = g.layers[0].attention
    return {
        "architecture": g.architecture, "parameters": params, "dtype": ckpt.dtype,
        "quantization": ckpt.quantization, "tp_size": ckpt.mapping.tp_size,
        "layers": g.num_layers, "hidden_size": g.hidden_size, "heads": a.num_heads, "kv_heads": a.num_kv_heads,
        "head_dim": a.head_dim, "vocab_size": g.vocab_size, "max_position_embeddings": g.max_position_embeddings,
    }


def _tactics(engine: Engine) -> dict[str, Any]:
    t = engine.tactics or {}
    if (engine.tuning or {}).get("state") == "untuned":
        state = "untuned"
    elif t:
        state = "tuned"
    else:
        state = "none" if engine.target.get("device") != "cuda" else "defaults"
    return {"state": state, "gemm_shapes": len(t.get("gemm", {})), "decode_attention": len(t.get("decode_attention", {})),
            "tuned_on": engine.target.get("gpu_name") if t else None, "tuning_seconds": t.get("tuning_seconds")}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_report(info: dict[str, Any]) -> str:
    q = info.get("quantization") or {}
    quant = q.get("quant_algo") or "none"
    if (q.get("quant_algo") or "").startswith("W4A16"):
        quant += f" (group {q.get('group_size')}{', zero points' if q.get('has_zero_point') else ''})"
    if q.get("kv_cache_quant_algo"):
        quant += f" + {q['kv_cache_quant_algo']} KV cache"
    lines = [
        f"{info['kind']} {info['path']}",
        f"  architecture   {info['architecture']} ({info['layers']} layers, hidden {info['hidden_size']}, heads "
        f"{info['heads']}/{info['kv_heads']} kv, vocab {info['vocab_size']})",
        f"  parameters     {info['parameters'] / 1e9:.3f} B ({info['parameters']:,})",
        f"  dtype          {info['dtype']}",
        f"  quantization   {quant}",
        f"  tp             {info['tp_size']}",
    ]
    if info["kind"] == "engine":
        bc, t, tac = info["build_config"], info["target"], info["tactics"]
        where = "cpu" if t.get("device") != "cuda" else (
            f"compute capability {t['compute_capability']}" + (f" ({t.get('gpu_name') or t.get('gpu_model')})"
                                                               if t.get("gpu_name") or t.get("gpu_model") else ""))
        lines += [
            f"  backend        {info['backend']} (trtc {info['trtc_version']})",
            f"  build limits   max_batch_size {bc['max_batch_size']}, max_seq_len {bc['max_seq_len']}, max_num_tokens "
            f"{bc['max_num_tokens']}, tokens_per_block {bc['tokens_per_block']}, kv_cache_dtype {bc['kv_cache_dtype']}",
            f"  target         {where}",
            f"  tactics        {tac['state']}" + (f": {tac['gemm_shapes']} GEMM shapes, tuned on {tac['tuned_on']}"
                                                   if tac["state"] == "tuned" else ""),
            f"  build id       {info['build_id']}",
        ]
        plan = info.get("memory_plan")
        if plan:
            lines.append(f"  memory plan    weights {_size(plan['weights'])}, KV cache {_size(plan['kv_cache'])} at "
                         f"max_batch_size x max_seq_len, activations {_size(plan['activations'])} (per rank)")
    lines.append(f"  files          {_size(info['total_bytes'])} in {len(info['files'])} files")
    lines += [f"    {name:<28} {_size(n)}" for name, n in info["files"].items() if "/" not in name]
    return "\n".join(lines)


def inspect_command(path: str, as_json: bool) -> str:
    info = inspect_dir(path)
    return json.dumps(info, indent=2) if as_json else format_report(info)

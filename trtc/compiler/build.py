"""`trtc build`: checkpoint -> engine directory.

    ENGINE/config.json       format version, trtc version, backend, pretrained_config (the layer
                             graph, mapping, dtype, quantization), build_config, target, tactics,
                             build_id (trtc/compiler/build_id.py)
    ENGINE/rank{N}.engine    that rank's weights in the kernels' layout (a safetensors container,
                             loaded without copies, straight onto the device; its metadata
                             carries the build_id)
    ENGINE/tokenizer/

Two builds from the same checkpoint and flags on the same machine give byte-identical files.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from trtc import __version__
from trtc.checkpoint import CheckpointConfig, rank_file
from trtc.compiler.build_config import BuildConfig
from trtc.compiler.build_id import METADATA_KEY, build_fingerprint
from trtc.compiler.layout import combine, engine_shape, engine_tensors
from trtc.errors import TrtcError
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.safetensors_writer import DTYPE_OF_CODE, SafetensorsWriter

ENGINE_FORMAT = "trtc-engine"
ENGINE_VERSION = 1
BACKENDS = ("auto", "cuda", "tensorrt")


def detect_target() -> dict:
    """What the engine is built for: this machine's GPU architecture, or the CPU."""
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "compute_capability": f"{major}.{minor}", "gpu_name": torch.cuda.get_device_name()}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise TrtcError(f"--backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if backend == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            raise TrtcError("--backend tensorrt needs TensorRT, which is not installed here (import tensorrt failed); use --backend cuda")
        raise TrtcError("--backend tensorrt is not available in this trtc version; use --backend cuda")
    return "cuda"


def build(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    build_config: BuildConfig | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    backend = resolve_backend(backend)
    check_output_dir(output_dir, overwrite)
    if not checkpoint_dir.is_dir():
        raise TrtcError(f"checkpoint directory {checkpoint_dir} does not exist; run `trtc convert` first")
    ckpt = CheckpointConfig.load(checkpoint_dir)
    config = (build_config or BuildConfig()).resolved(ckpt.graph, ckpt.dtype, ckpt.quantization)
    if config.max_seq_len > ckpt.graph.max_position_embeddings:
        rope_types = {layer.attention.rope.type for layer in ckpt.graph.layers}
        if rope_types <= {"default"}:
            print(f"warning: --max_seq_len {config.max_seq_len} exceeds the model's max_position_embeddings "
                  f"{ckpt.graph.max_position_embeddings}; quality beyond it is not guaranteed")
    world = ckpt.mapping.world_size
    for rank in range(world):
        if not rank_file(checkpoint_dir, rank).is_file():
            raise TrtcError(f"{rank_file(checkpoint_dir, rank)} is missing; the checkpoint is incomplete, convert again")

    engine_config = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_VERSION,
        "trtc_version": __version__,
        "backend": backend,
        "pretrained_config": ckpt.to_dict(),
        "build_config": config.to_dict(),
        "target": detect_target(),
        "tactics": {},
    }
    engine_config["build_id"] = build_id = build_fingerprint(engine_config, checkpoint_dir, world)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        for rank in range(world):
            _build_rank(checkpoint_dir, tmp, rank, ckpt, progress, build_id)
        (tmp / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
        if (checkpoint_dir / "tokenizer").is_dir():
            shutil.copytree(checkpoint_dir / "tokenizer", tmp / "tokenizer")
    return output_dir


def _build_rank(
    checkpoint_dir: Path, out: Path, rank: int, ckpt: CheckpointConfig, progress: bool | None, build_id: str
) -> None:
    path = rank_file(checkpoint_dir, rank)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise TrtcError(f"{path} is not a valid safetensors file ({e}); convert the model again") from None
    with f:
        names = sorted(f.keys())
        scalar = {n for n in names if f.get_slice(n).get_shape() == []}
        plan = engine_tensors(names, ckpt.graph, scalar)
        rows = {target: [f.get_slice(w).get_shape()[0] for w in t.weights] for target, t in plan.items()}
        entries = []
        for target, t in plan.items():
            shapes = [f.get_slice(p).get_shape() for p in t.parts]
            dtype = DTYPE_OF_CODE[f.get_slice(t.parts[0]).get_dtype()]
            entries.append((target, dtype, engine_shape(t, shapes, rows[target])))
        disable = None if progress is None else not progress
        metadata = {"format": "pt", METADATA_KEY: build_id}
        with SafetensorsWriter(rank_file(out, rank, "engine"), entries, metadata) as writer:
            for target, t in tqdm(plan.items(), desc=f"build rank {rank}", unit="tensor", disable=disable):
                writer.write(target, combine(target, t, [f.get_tensor(p) for p in t.parts], rows[target]))


def build_from_hf(
    model_dir: str | Path,
    output_dir: str | Path,
    tp_size: int = 1,
    dtype: str = "auto",
    build_config: BuildConfig | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
    quantize: dict | None = None,
) -> Path:
    """convert (or, with `quantize`, the keyword arguments of trtc.quantization.quantize.quantize:
    qformat, calib_dataset, ...) + build in one go; the checkpoint lives in a temporary directory.
    --kv_cache_dtype fp8 calibrates the KV cache along with the weights."""
    from trtc.converters.convert import convert

    resolve_backend(backend)
    check_output_dir(Path(output_dir), overwrite)
    build_config = build_config or BuildConfig()
    fp8_kv = build_config.kv_cache_dtype == "fp8"
    if fp8_kv and quantize is None:
        raise TrtcError("--kv_cache_dtype fp8 needs calibrated KV-cache scales; add --fp8, --int4_awq or --int4_gptq "
                        "with --calib_dataset")
    with tempfile.TemporaryDirectory(prefix="trtc-ckpt-") as tmp:
        if quantize is not None:
            from trtc.quantization.quantize import quantize as run_quantize

            ckpt = run_quantize(model_dir, Path(tmp) / "ckpt", tp_size=tp_size, dtype=dtype, progress=progress,
                                kv_cache_dtype="fp8" if fp8_kv else None, **quantize)
        else:
            ckpt = convert(model_dir, Path(tmp) / "ckpt", tp_size=tp_size, dtype=dtype, progress=progress)
        return build(ckpt, output_dir, build_config, backend, overwrite, progress)

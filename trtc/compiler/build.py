"""`trtc build`: checkpoint -> engine directory.

    ENGINE/config.json       format version, trtc version, backend, pretrained_config (the layer
                             graph, mapping, dtype, quantization), build_config, target, tactics,
                             build_id (trtc/formats/build_id.py)
    ENGINE/rank{N}.engine    that rank's weights in the kernels' layout (a safetensors container,
                             loaded without copies, straight onto the device; its metadata
                             carries the build_id)
    ENGINE/tokenizer/

That is the cuda backend's directory; the tensorrt backend's (ONNX graphs, TensorRT plans) is
described in trtc/backends/tensorrt/__init__.py and built by build_tensorrt.py.

Two builds from the same checkpoint and flags give byte-identical rank files. On a GPU the cuda
build also times the kernels' tactics for the engine's shapes (compiler/autotune.py) into config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from trtc.compiler.autotune import autotune
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.build_id import METADATA_KEY, build_fingerprint
from trtc.formats.checkpoint import CheckpointConfig, rank_file, torch_dtype
from trtc.formats.engine import ENGINE_FORMAT, ENGINE_VERSION, detect_target
from trtc.formats.rank_tensors import checkpoint_rank
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.safetensors_writer import SafetensorsWriter
from trtc.version import __version__

log = logging.getLogger("trtc")

BACKENDS = ("auto", "cuda", "tensorrt")


def resolve_backend(backend: str) -> str:
    """cuda or tensorrt; auto is tensorrt where `import tensorrt` works and there is a GPU."""
    from trtc.backends import tensorrt

    if backend not in BACKENDS:
        raise TrtcError(f"--backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "tensorrt" if tensorrt.available() and torch.cuda.is_available() else "cuda"
    if backend == "tensorrt":
        from trtc.compiler.build_tensorrt import require_onnx

        require_onnx()
    return backend


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
            log.warning(f"warning: --max_seq_len {config.max_seq_len} exceeds the model's max_position_embeddings "
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
        if backend == "cuda":
            for rank in range(world):
                _build_rank(checkpoint_dir, tmp, rank, ckpt, progress, build_id)
            engine_config["tactics"] = autotune(tmp, ckpt.graph, ckpt.mapping, config, torch_dtype(ckpt.dtype),
                                                engine_config["target"], log=print if progress is not False else _quiet)
        else:
            from trtc.compiler.build_tensorrt import lower_and_build

            engine_config["tensorrt"] = lower_and_build(
                tmp, ckpt, config, lambda rank: checkpoint_rank(checkpoint_dir, rank, ckpt.graph), output_dir)
        (tmp / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
        if (checkpoint_dir / "tokenizer").is_dir():
            shutil.copytree(checkpoint_dir / "tokenizer", tmp / "tokenizer")
    if backend == "tensorrt" and engine_config["tensorrt"] is None:
        from trtc.backends.tensorrt import ONNX_DIR, missing, unfinished

        raise TrtcError(unfinished(missing(), str(output_dir / ONNX_DIR), str(output_dir)))
    return output_dir


def _quiet(*_: object) -> None:
    pass


def _build_rank(
    checkpoint_dir: Path, out: Path, rank: int, ckpt: CheckpointConfig, progress: bool | None, build_id: str
) -> None:
    with checkpoint_rank(checkpoint_dir, rank, ckpt.graph) as source:
        disable = None if progress is None else not progress
        metadata = {"format": "pt", METADATA_KEY: build_id}
        with SafetensorsWriter(rank_file(out, rank, "engine"), source.entries, metadata) as writer:
            bar = tqdm(source.read(), total=len(source.entries), desc=f"build rank {rank}", unit="tensor", disable=disable)
            for name, tensor in bar:
                writer.write(name, tensor)


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

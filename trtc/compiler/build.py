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
build also times the kernels' tactics for the engine's shapes (compiler/autotune.py) into config.json;
built for another GPU (--target sm90 on a CPU runner) it records {"tuning": {"state": "untuned"}}
and the tactics are tuned at the first load on that GPU (compiler/tune.py). Every build starts by
printing its memory plan (compiler/memory_plan.py) and stops there if the plan cannot fit the GPU.
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
from trtc.compiler.memory_plan import MemoryPlan, capacity, memory_plan
from trtc.compiler.targets import is_here, resolve_target
from trtc.compiler.tune import UNTUNED
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.build_id import METADATA_KEY, build_fingerprint
from trtc.formats.checkpoint import CheckpointConfig, rank_file, torch_dtype
from trtc.formats.engine import ENGINE_FORMAT, ENGINE_VERSION
from trtc.formats.quant_layout import QuantConfig
from trtc.formats.rank_tensors import checkpoint_rank
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.safetensors_writer import SafetensorsWriter
from trtc.version import __version__

log = logging.getLogger("trtc")

BACKENDS = ("auto", "cuda", "tensorrt")
logger = logging.getLogger("trtc")


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
    target: str | None = None,
    gpu_memory: float | None = None,
    build_flags: dict | None = None,
    show_plan: bool = True,
) -> Path:
    """target: --target (compiler/targets.py; None: this machine). gpu_memory: GiB of the target
    GPU for the memory plan's check (None: the GPU present or named). build_flags: the resolved
    command-line/config-file flags, recorded in config.json."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    say = print if progress is not False else _quiet
    target_config = resolve_target(target)
    backend = resolve_backend(backend) if backend != "auto" or is_here(target_config) else "cuda"
    if backend == "tensorrt" and not is_here(target_config):
        raise TrtcError("--backend tensorrt builds TensorRT plans on the target GPU itself; use --backend cuda "
                        "with --target on a machine without it")
    check_output_dir(output_dir, overwrite)
    ckpt, config, plan = plan_checkpoint_build(checkpoint_dir, build_config, target_config, gpu_memory)
    if show_plan:
        _log_plan(plan, progress)
    plan.check()
    if config.max_seq_len > ckpt.graph.max_position_embeddings:
        rope_types = {layer.attention.rope.type for layer in ckpt.graph.layers}
        if rope_types <= {"default"}:
            log.warning(f"warning: --max_seq_len {config.max_seq_len} exceeds the model's max_position_embeddings "
                        f"{ckpt.graph.max_position_embeddings}; quality beyond it is not guaranteed")
    world = ckpt.mapping.world_size
    for rank in range(world):
        if not rank_file(checkpoint_dir, rank).is_file():
            raise TrtcError(f"{rank_file(checkpoint_dir, rank)} is missing; the checkpoint is incomplete, convert again")

    tune_here = is_here(target_config)
    engine_config = {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_VERSION,
        "trtc_version": __version__,
        "backend": backend,
        "pretrained_config": ckpt.to_dict(),
        "build_config": config.to_dict(),
        "target": target_config,
        "tactics": {},
    }
    engine_config["build_id"] = build_id = build_fingerprint(engine_config, checkpoint_dir, world)
    # recorded, not fingerprinted: what the build was asked and planned (the same output either way)
    engine_config["memory_plan"] = plan.to_dict()
    if build_flags is not None:
        engine_config["build_flags"] = build_flags
    with atomic_output_dir(output_dir, overwrite) as tmp:
        if backend == "cuda":
            for rank in range(world):
                _build_rank(checkpoint_dir, tmp, rank, ckpt, progress, build_id)
            if tune_here:
                engine_config["tactics"] = autotune(tmp, ckpt.graph, ckpt.mapping, config, torch_dtype(ckpt.dtype),
                                                    target_config, log=say)
            elif target_config["device"] == "cuda":
                engine_config["tuning"] = UNTUNED
                say(f"built for compute capability {target_config['compute_capability']} without that GPU: its kernel "
                    "tactics are tuned at the first load there (or by `trtc tune ENGINE`) and stored in the engine")
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


def plan_checkpoint_build(checkpoint_dir: Path, build_config: BuildConfig | None, target: dict,
                          gpu_memory: float | None = None) -> tuple[CheckpointConfig, BuildConfig, MemoryPlan]:
    """The checkpoint's config, the resolved build config and the memory plan; reads config.json only."""
    if not checkpoint_dir.is_dir():
        raise TrtcError(f"checkpoint directory {checkpoint_dir} does not exist; run `trtc convert` first")
    ckpt = CheckpointConfig.load(checkpoint_dir)
    config = (build_config or BuildConfig()).resolved(ckpt.graph, ckpt.dtype, ckpt.quantization)
    plan = memory_plan(ckpt.graph, ckpt.mapping, ckpt.dtype, QuantConfig.from_dict(ckpt.quantization), config,
                       capacity(target, gpu_memory))
    return ckpt, config, plan


def _quiet(*_: object) -> None:
    pass


def _log_plan(plan: MemoryPlan, progress: bool | None) -> None:
    """The plan on the log (stderr), so that a build's output stays its result or its one-line error."""
    if progress is not False:
        for line in plan.lines():
            logger.info(line)


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
    target: str | None = None,
    gpu_memory: float | None = None,
    build_flags: dict | None = None,
) -> Path:
    """convert (or, with `quantize`, the keyword arguments of trtc.quantization.quantize.quantize:
    qformat, calib_dataset, ...) + build in one go; the checkpoint lives in a temporary directory.
    --kv_cache_dtype fp8 calibrates the KV cache along with the weights. The memory plan is printed
    and checked before the conversion starts."""
    from trtc.converters.convert import convert

    resolve_backend(backend)
    check_output_dir(Path(output_dir), overwrite)
    build_config = build_config or BuildConfig()
    fp8_kv = build_config.kv_cache_dtype == "fp8"
    if fp8_kv and quantize is None:
        raise TrtcError("--kv_cache_dtype fp8 needs calibrated KV-cache scales; add --fp8, --int4_awq or --int4_gptq "
                        "with --calib_dataset")
    plan = plan_hf_build(model_dir, tp_size, dtype, build_config, quantize, resolve_target(target), gpu_memory)
    _log_plan(plan, progress)
    plan.check()
    with tempfile.TemporaryDirectory(prefix="trtc-ckpt-") as tmp:
        if quantize is not None:
            from trtc.quantization.quantize import quantize as run_quantize

            ckpt = run_quantize(model_dir, Path(tmp) / "ckpt", tp_size=tp_size, dtype=dtype, progress=progress,
                                kv_cache_dtype="fp8" if fp8_kv else None, **quantize)
        else:
            ckpt = convert(model_dir, Path(tmp) / "ckpt", tp_size=tp_size, dtype=dtype, progress=progress)
        return build(ckpt, output_dir, build_config, backend, overwrite, progress, target, gpu_memory, build_flags,
                     show_plan=False)


def plan_hf_build(model_dir: str | Path, tp_size: int, dtype: str, build_config: BuildConfig | None,
                  quantize: dict | None, target: dict, gpu_memory: float | None = None) -> MemoryPlan:
    """The memory plan of building an HF directory, from its config.json and weight headers only."""
    from trtc.converters import architecture_for
    from trtc.converters.convert import resolve_dtype
    from trtc.converters.hf_checkpoint import HFCheckpoint
    from trtc.converters.quantized import read_format
    from trtc.formats.checkpoint import dtype_name
    from trtc.formats.mapping import Mapping
    from trtc.quantization.quantize import QFORMATS

    hf = HFCheckpoint(Path(model_dir))
    arch = architecture_for(hf.config)
    graph = arch.graph_from_config(hf.config)
    mapping = Mapping.for_tp(tp_size)
    mapping.validate(graph)
    quant = read_format(hf, graph, arch.weights).quant
    build_config = build_config or BuildConfig()
    if quantize is not None:
        kv = "FP8" if build_config.kv_cache_dtype == "fp8" else None
        quant = QuantConfig(quant_algo=QFORMATS[quantize["qformat"]], kv_cache_quant_algo=kv,
                            group_size=quantize.get("awq_block_size", 128))
    name = dtype_name(resolve_dtype(dtype, hf.config, hf, arch.weights.source("embedding.weight")))
    config = build_config.resolved(graph, name, quant.to_dict() if quant else None)
    return memory_plan(graph, mapping, name, quant, config, capacity(target, gpu_memory))

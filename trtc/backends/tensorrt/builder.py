"""ONNX graphs -> TensorRT plans (needs TensorRT >= 10.8 and a GPU).

Per rank: `trt.OnnxParser` into a strongly typed network (the graph's own types and casts decide
every precision, as in the cuda backend; TF32 off), one optimization profile from the build limits
(profiles.py), the preview feature that lets PagedAttention's pool output alias its input, and
`build_serialized_network`. One timing cache serves every rank and is stored beside the plans, so
a rebuild into the same directory skips the kernel timing it already did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import tensorrt as trt

from trtc.backends.tensorrt import TIMING_CACHE, plugins  # noqa: F401  (registers the trtc plugins)
from trtc.backends.tensorrt.profiles import optimization_profile
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.onnx.export import onnx_files

log = logging.getLogger("trtc")


def build_plans(onnx_dir: Path, out: Path, graph: ModelGraph, mapping: Mapping, bc: BuildConfig,
                timing_cache: Path | None = None) -> dict:
    """Write out/rank{N}.engine for every rank and out/timing.cache (seeded from `timing_cache`
    when it exists). Returns what config.json records under "tensorrt"."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    config.set_preview_feature(trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03, True)
    config.clear_flag(trt.BuilderFlag.TF32)  # float32 GEMMs in float32, as torch (the cuda backend) does
    seed = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(seed)
    config.set_timing_cache(cache, ignore_mismatch=False)
    shapes = optimization_profile(graph, mapping, bc)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    for rank in range(mapping.world_size):
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        path = onnx_dir / onnx_files(rank)[0]
        if not parser.parse_from_file(str(path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TrtcError(f"TensorRT's ONNX parser rejected {path} ({errors}); rebuild with --backend cuda")
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TrtcError(f"TensorRT could not build {path} (see the log above); rebuild with --backend cuda")
        (out / f"rank{rank}.engine").write_bytes(bytes(plan))
        log.info("built TensorRT plan rank%d.engine (%.1f MiB)", rank, plan.nbytes / 2**20)
    (out / TIMING_CACHE).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "tensorrt_version": trt.__version__,
        "strongly_typed": True,
        "optimization_profile": {name: [list(s) for s in p] for name, p in shapes.items()},
    }

"""`trtc build --backend tensorrt` and `trtc build --from_onnx`: the engine directory of the
tensorrt backend (layout: trtc/backends/tensorrt/__init__.py).

Lowering to ONNX needs only the `onnx` package and runs anywhere; the plans need TensorRT and a GPU.
Where either is missing the build stops after the ONNX graphs, with a directory that `--from_onnx`
finishes on a machine that has them.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from trtc.backends import tensorrt
from trtc.backends.tensorrt import ONNX_DIR, TIMING_CACHE
from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.checkpoint import CheckpointConfig
from trtc.formats.engine import ENGINE_FORMAT, ENGINE_VERSION, detect_target
from trtc.formats.rank_tensors import RankTensors
from trtc.utils.atomic_dir import atomic_output_dir, check_output_dir
from trtc.utils.config_json import check_format, read_config_json
from trtc.version import __version__

PROFILE_LIMITS = ("max_batch_size", "max_seq_len", "max_num_tokens")  # what --from_onnx may change


def require_onnx() -> None:
    if importlib.util.find_spec("onnx") is None:
        raise TrtcError("--backend tensorrt writes ONNX graphs and needs the onnx package; pip install 'trtc[onnx]'")


def lower_and_build(tmp: Path, ckpt: CheckpointConfig, config: BuildConfig,
                    open_rank: Callable[[int], AbstractContextManager[RankTensors]], output_dir: Path) -> dict | None:
    """tmp/onnx/, then the plans where TensorRT is installed. Returns config.json's "tensorrt"
    record, None when only the ONNX graphs were written."""
    from trtc.onnx.export import write_onnx_dir

    write_onnx_dir(tmp / ONNX_DIR, ckpt, config, open_rank)
    if tensorrt.missing() is not None:
        return None
    from trtc.backends.tensorrt.builder import build_plans

    return build_plans(tmp / ONNX_DIR, tmp, ckpt.graph, ckpt.mapping, config, output_dir / TIMING_CACHE)


def build_from_onnx(source: str | Path, output_dir: str | Path, limits: dict | None = None,
                    overwrite: bool = False) -> Path:
    """The plans of a directory written by `trtc build --backend tensorrt` (on a machine without
    TensorRT, or to rebuild with other profile limits: --max_batch_size, --max_seq_len,
    --max_num_tokens) into `output_dir`, which may be `source` itself with --overwrite."""
    source, output_dir = Path(source), Path(output_dir)
    fix = "pass the directory that `trtc build --backend tensorrt` wrote"
    d = read_config_json(source, "--from_onnx directory", fix)
    check_format(d, source, ENGINE_FORMAT, ENGINE_VERSION, fix)
    if d.get("backend") != "tensorrt":
        raise TrtcError(f"{source} is an engine of backend {d.get('backend')!r}, not a tensorrt build; {fix}")
    try:
        ckpt = CheckpointConfig.from_dict(d["pretrained_config"])
        config = BuildConfig(**{**d["build_config"], **(limits or {})})
    except (KeyError, TypeError) as e:
        raise TrtcError(f"{source / 'config.json'} is incomplete ({e}); build it again with "
                        "`trtc build --backend tensorrt`") from None
    from trtc.onnx.export import PLUGINS_FILE, onnx_files

    onnx_dir = source / ONNX_DIR
    needed = [onnx_dir / PLUGINS_FILE] + [onnx_dir / f for r in range(ckpt.mapping.world_size) for f in onnx_files(r)]
    for path in needed:
        if not path.is_file():
            raise TrtcError(f"{path} is missing; build it again with `trtc build --backend tensorrt`")
    reason = tensorrt.missing()
    if reason is not None:
        raise TrtcError(f"{reason}; run `trtc build --from_onnx {source} --output_dir {output_dir}` on a machine "
                        "with TensorRT and a GPU")
    check_output_dir(output_dir, overwrite)
    from trtc.backends.tensorrt.builder import build_plans

    seed = output_dir / TIMING_CACHE if (output_dir / TIMING_CACHE).is_file() else source / TIMING_CACHE
    with atomic_output_dir(output_dir, overwrite) as tmp:
        shutil.copytree(onnx_dir, tmp / ONNX_DIR)
        record = build_plans(tmp / ONNX_DIR, tmp, ckpt.graph, ckpt.mapping, config, seed)
        engine_config = {**d, "trtc_version": __version__, "build_config": config.to_dict(), "target": detect_target(),
                         "tensorrt": record}
        (tmp / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
        if (source / "tokenizer").is_dir():
            shutil.copytree(source / "tokenizer", tmp / "tokenizer")
    return output_dir

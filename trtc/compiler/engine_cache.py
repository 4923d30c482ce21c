"""Engines built from HF directories by `LLM(hf_dir)`, cached by what determines them: the
checkpoint's content, the build flags, the trtc version and the build target."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.formats.engine import detect_target
from trtc.utils.cache import cache_home
from trtc.version import __version__


def cache_root() -> Path:
    return cache_home() / "engines"


def cache_key(model_dir: Path, flags: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"trtc": __version__, "target": detect_target(), "flags": flags}, sort_keys=True).encode())
    for path in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:32]


def cached_engine(
    model_dir: str | Path, tp_size: int = 1, dtype: str = "auto", build_config: BuildConfig | None = None,
    backend: str = "auto",
) -> Path:
    """The engine directory for these inputs, built on first use and reused after."""
    model_dir = Path(model_dir)
    build_config = build_config or BuildConfig()
    flags = {"tp_size": tp_size, "dtype": dtype, "backend": backend, "build_config": build_config.to_dict()}
    engine_dir = cache_root() / cache_key(model_dir, flags)
    if not (engine_dir / "config.json").is_file():
        build_from_hf(model_dir, engine_dir, tp_size, dtype, build_config, backend, overwrite=True)
    return engine_dir

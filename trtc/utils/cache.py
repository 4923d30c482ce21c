"""Where trtc caches what it can make again: engines built by `LLM(hf_dir)`, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """$TRTC_CACHE_DIR, default ~/.cache/trtc."""
    return Path(os.environ.get("TRTC_CACHE_DIR", Path.home() / ".cache" / "trtc"))

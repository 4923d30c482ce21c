"""Converters: HF checkpoint -> layer graph + per-rank weights. The registry is keyed on HF
`architectures[0]`; adding an architecture whose layers exist is one file here and a line below."""

from __future__ import annotations

from typing import Any

from trtc.converters import (
    exaone4,
    gemma2,
    gemma3,
    llama,
    mistral,
    mixtral,
    nemotron,
    phi3,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
)
from trtc.converters.architecture import Architecture
from trtc.errors import TrtcError

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        llama.ARCHITECTURE, mistral.ARCHITECTURE, qwen2.ARCHITECTURE, qwen3.ARCHITECTURE, gemma2.ARCHITECTURE,
        phi3.ARCHITECTURE, gemma3.ARCHITECTURE, nemotron.ARCHITECTURE, exaone4.ARCHITECTURE,
        mixtral.ARCHITECTURE, qwen2_moe.ARCHITECTURE, qwen3_moe.ARCHITECTURE,
    )
}


def architecture_for(config: dict[str, Any]) -> Architecture:
    names = config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if not names:
        raise TrtcError(f"config.json has no 'architectures' entry; set it to one of: {supported}")
    if names[0] not in ARCHITECTURES:
        raise TrtcError(f"architecture {names[0]} is not supported; supported: {supported}")
    return ARCHITECTURES[names[0]]

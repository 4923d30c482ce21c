"""`trtc build --target`: the GPU an engine is built for, by architecture (sm90) or by name (h200).

    auto        this machine: its GPU, or the CPU where there is none (formats/engine.py detect_target)
    cpu         the CPU (the plugins' reference implementations)
    smXY        compute capability X.Y (sm80, sm89, sm90, sm100, ...)
    a GPU name  that GPU's architecture and memory (h100, h200, a100, l40s, b200, ...)

An engine built for a GPU on a machine without it carries no kernel tactics: they are tuned on the
GPU at its first load, or by `trtc tune ENGINE`, and stored into the engine (compiler/tune.py).
"""

from __future__ import annotations

import re

from trtc.errors import TrtcError
from trtc.formats.engine import detect_target

GIB = 2**30
# name -> (compute capability, memory in GiB as torch.cuda reports it)
GPUS = {
    "a100": ("8.0", 79.2),
    "a10g": ("8.6", 22.1),
    "l4": ("8.9", 22.0),
    "l40s": ("8.9", 44.4),
    "h100": ("9.0", 79.2),
    "h200": ("9.0", 139.8),
    "gh200": ("9.0", 94.5),
    "b200": ("10.0", 178.4),
}
_SM = re.compile(r"sm_?(\d+)(\d)")


def resolve_target(target: str | None) -> dict:
    """config.json "target" for --target (None or auto: this machine)."""
    name = (target or "auto").strip().lower()
    if name == "auto":
        return detect_target()
    if name == "cpu":
        return {"device": "cpu"}
    m = _SM.fullmatch(name)
    if m:
        return {"device": "cuda", "compute_capability": f"{m.group(1)}.{m.group(2)}", "gpu_name": None}
    if name in GPUS:
        cc, memory = GPUS[name]
        return {"device": "cuda", "compute_capability": cc, "gpu_name": None, "gpu_model": name, "memory_gib": memory}
    raise TrtcError(f"--target {target!r} is not a target; use auto, cpu, an architecture like sm90, "
                    f"or a GPU name: {', '.join(GPUS)}")


def is_here(target: dict) -> bool:
    """Whether this machine is the target: its kernels can be timed (tuned) here."""
    here = detect_target()
    if target.get("device") != here.get("device"):
        return False
    return here["device"] == "cpu" or here["compute_capability"] == target["compute_capability"]


def target_memory_bytes(target: dict) -> int | None:
    """The memory of the target's GPU: the GPU present when it is the target, else the named GPU's."""
    if target.get("device") != "cuda":
        return None
    if is_here(target):
        import torch

        return torch.cuda.mem_get_info()[1]
    if target.get("memory_gib"):
        return int(target["memory_gib"] * GIB)
    return None

"""Tuning an engine's kernel tactics after its build: for an engine built for a GPU on a machine
without it (`trtc build --target sm90` on a CPU runner), at its first load on that GPU (the runtime
calls `tune_at_first_load`), or by `trtc tune ENGINE`.

Such an engine's config.json says {"tuning": {"state": "untuned"}} and holds no tactics. Tuning
times the candidates on the engine's own weights (compiler/autotune.py, as a build on the GPU
does), then writes config.json again with the tactics, the GPU's name in "target" and
{"tuning": {"state": "tuned", ...}}: to a temporary file beside it, renamed over it, so a reader
sees the old file or the new one, never a part. The next load does no tuning. Where the engine
directory is read-only the tactics serve this process only (a warning says so).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from trtc.compiler.autotune import autotune
from trtc.errors import TrtcError
from trtc.formats.checkpoint import torch_dtype
from trtc.formats.engine import Engine, detect_target

log = logging.getLogger("trtc")

UNTUNED = {"state": "untuned", "when": "first load on the target GPU, or `trtc tune ENGINE`"}


def is_untuned(engine: Engine) -> bool:
    return engine.backend == "cuda" and (engine.tuning or {}).get("state") == "untuned"


def tune_engine(engine: Engine, force: bool = False, log_line=log.info) -> Engine:
    """Tune `engine` on this machine's GPU and store the tactics into its config.json. force: tune
    again an engine that has tactics. Returns the engine with its tactics."""
    if engine.backend != "cuda":
        raise TrtcError(f"engine {engine.directory} has backend {engine.backend}; only cuda engines hold trtc's tactics")
    if engine.target.get("device") != "cuda":
        raise TrtcError(f"engine {engine.directory} is built for the CPU, which has no tactics to tune; "
                        "build it with --target (sm90, h100, ...) for a GPU")
    here = detect_target()
    if here["device"] != "cuda":
        raise TrtcError(f"`trtc tune` times kernels on the GPU the engine is for (compute capability "
                        f"{engine.target['compute_capability']}) and this machine has none; run it there, "
                        "or let the engine's first load there tune it")
    engine.check_runtime(torch.device("cuda"))  # another architecture: one line
    if engine.tactics and not force and not is_untuned(engine):
        log_line(f"engine {engine.directory} is already tuned on {engine.target.get('gpu_name')}; --force tunes again")
        return engine
    start = time.perf_counter()
    log_line(f"tuning the kernel tactics of {engine.directory} on {here['gpu_name']} (once; stored in the engine)")
    tactics = autotune(engine.directory, engine.graph, engine.mapping, engine.build_config,
                       torch_dtype(engine.pretrained.dtype), here, log=log_line)
    target = {**engine.target, "gpu_name": here["gpu_name"]}
    tuning = {"state": "tuned", "gpu_name": here["gpu_name"], "seconds": round(time.perf_counter() - start, 1)}
    try:
        update_engine_config(engine.directory, {"tactics": tactics, "target": target, "tuning": tuning})
    except OSError as e:
        log.warning("could not store the tuned tactics in %s (%s); this process uses them, the next load tunes again",
                    engine.directory, e.strerror or e)
    return dataclasses.replace(engine, tactics=tactics, target=target, tuning=tuning)


def tune_at_first_load(engine: Engine, device: torch.device) -> Engine:
    """The engine to run on `device`: tuned first if it was built without its GPU and this is one."""
    if device.type != "cuda" or not is_untuned(engine):
        return engine
    return tune_engine(engine)


def update_engine_config(directory: Path, fields: dict) -> None:
    """Replace `fields` of directory/config.json atomically (a temporary file renamed over it)."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".json.tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

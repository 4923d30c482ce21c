"""Checks of the files a command reads and writes, made before any work, with one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

from trtc.errors import TrtcError


def check_input_file(path: str | Path, flag: str, fix: str = "pass a file") -> Path:
    """`path` as a Path if it is a readable file; else a TrtcError naming the flag and what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise TrtcError(f"{flag} {path} is a directory, not a file; {fix}")
    if not path.exists():
        raise TrtcError(f"{flag} {path} does not exist; {fix}")
    if not os.access(path, os.R_OK):
        raise TrtcError(f"{flag} {path} cannot be read (permission denied); fix its permissions or {fix}")
    return path


def check_output_file(path: str | Path | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that fills it."""
    if path is None:
        return
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise TrtcError(f"{flag} {path} is a directory; pass a file path")
    if not parent.is_dir():
        problem = "is a file" if parent.exists() else "does not exist"
        raise TrtcError(f"{flag} {path}: its directory {parent} {problem}; create the directory or pass another path")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrtcError(f"{flag} {path} cannot be written (permission denied); pass a path you can write")

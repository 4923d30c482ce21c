"""Output directories that appear only when complete: write to a temp dir beside, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from trtc.errors import TrtcError


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise TrtcError(f"output path {output_dir} exists and is not a directory; choose another --output_dir")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise TrtcError(
            f"output directory {output_dir} exists and is not empty; pass --overwrite to replace it"
        )


@contextlib.contextmanager
def atomic_output_dir(output_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `output_dir` when the block succeeds.

    On any exception the temporary directory is removed and `output_dir` is left as it was.
    """
    output_dir = Path(output_dir).absolute()
    check_output_dir(output_dir, overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result should look like a mkdir
    try:
        yield tmp
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent))
            output_dir.rename(old / "d")
            tmp.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

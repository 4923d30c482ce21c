"""A Hugging Face cache populated the way huggingface_hub lays it out
(https://huggingface.co/docs/huggingface_hub/guides/manage-cache), so that model ids resolve with
HF_HUB_OFFLINE=1 and no network:

    HF_HUB_CACHE/models--{org}--{name}/blobs/{sha256 of the file}
                                      /snapshots/{commit}/{file} -> ../../blobs/{sha256}
                                      /refs/{revision}            the commit, no newline
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def populate(cache: Path, repo_id: str, source: Path, commit: str = "0123456789abcdef0123456789abcdef01234567",
             refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of `source` into `cache` as snapshot `commit` of model `repo_id`; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in sorted(source.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot

"""Reading the config.json of a model, checkpoint or engine directory, with one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trtc.errors import TrtcError
from trtc.version import __version__


def read_config_json(directory: Path, what: str, fix: str) -> dict[str, Any]:
    """directory/config.json as a dict; otherwise a TrtcError naming the problem and `fix`."""
    directory = Path(directory)
    if not directory.is_dir():
        problem = "is a file, not a directory" if directory.exists() else "does not exist"
        raise TrtcError(f"{what} {directory} {problem}; {fix}")
    path = directory / "config.json"
    if not path.is_file():
        raise TrtcError(f"{path} is missing; {fix}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrtcError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(config, dict):
        raise TrtcError(f"{path} is not a JSON object; {fix}")
    return config


def check_format(config: dict[str, Any], directory: Path, fmt: str, version: int, fix: str) -> None:
    """Refuse a directory of another format, or of another version of this format."""
    if config.get("format") != fmt:
        raise TrtcError(f"{directory} is not a {fmt} directory; {fix}")
    if config.get("format_version") != version:
        raise TrtcError(
            f"{directory} has {fmt} format version {config.get('format_version')} (trtc "
            f"{config.get('trtc_version')}), this trtc {__version__} reads version {version}; {fix}"
        )

"""Calibration data: plain-text files cut into token windows that start with BOS, as the model
sees text at inference (the same windows `trtc eval` scores)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from trtc.errors import TrtcError
from trtc.utils.paths import check_input_file

log = logging.getLogger("trtc")

# The default calibration text, shipped so that quantization works offline: the first 300 kB of
# Jane Austen's Pride and Prejudice (public domain).
DEFAULT_CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"


def read_texts(paths: list[str | Path], flag: str = "--calib_dataset") -> list[str]:
    """The texts of plain-text files, or of .jsonl files (one JSON string or {"text": ...} a line)."""
    if not paths:
        raise TrtcError(f"no text given; pass {flag} FILE (plain UTF-8 text or .jsonl)")
    texts = []
    for p in paths:
        p = check_input_file(p, flag, "pass a plain-text or .jsonl file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TrtcError(f"{flag} {p} is not UTF-8 text ({e})") from None
        if p.suffix == ".jsonl":
            text = "\n\n".join(_jsonl_texts(p, text, flag))
        if not text.strip():
            raise TrtcError(f"{flag} {p} is empty; pass a file with text in it")
        texts.append(text)
    return texts


def _jsonl_texts(path: Path, text: str, flag: str) -> list[str]:
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrtcError(f"{flag} {path} line {n} is not JSON ({e})") from None
        value = record.get("text") if isinstance(record, dict) else record
        if not isinstance(value, str):
            raise TrtcError(f"{flag} {path} line {n} has no text (a JSON string or an object with \"text\")")
        out.append(value)
    return out


def token_windows(ids: list[int], window_len: int, bos: int | None, max_windows: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of `window_len` tokens: BOS then the next window_len - 1 text tokens
    (no BOS: window_len text tokens). The last window may be shorter."""
    step = window_len - 1 if bos is not None else window_len
    windows = []
    for start in range(0, len(ids), step):
        if max_windows is not None and len(windows) == max_windows:
            break
        windows.append(([bos] if bos is not None else []) + ids[start : start + step])
    return windows


def calibration_batches(
    tokenizer, paths: list[str | Path], num_windows: int, window_len: int, batch_size: int, bos: int | None
) -> list[torch.Tensor]:
    """`num_windows` full windows from the texts (concatenated), in batches [B, window_len]."""
    if num_windows < 1 or window_len < 2 or batch_size < 1:
        raise TrtcError(
            f"--calib_size ({num_windows}), --calib_max_seq_length ({window_len}) and --batch_size ({batch_size}) "
            "must be positive (the window at least 2 tokens)"
        )
    ids: list[int] = []
    for text in read_texts(paths):
        ids += tokenizer(text, add_special_tokens=False).input_ids
    full = [w for w in token_windows(ids, window_len, bos, num_windows) if len(w) == window_len]
    if not full:
        raise TrtcError(
            f"the calibration text has {len(ids)} tokens, fewer than one window of {window_len}; "
            "pass more text or a smaller --calib_max_seq_length"
        )
    if len(full) < num_windows:
        log.warning(f"warning: the calibration text holds {len(full)} windows of {window_len} tokens, fewer than "
                    f"--calib_size {num_windows}; calibrating on {len(full)}")
    data = torch.tensor(full)
    return list(data.split(batch_size))

"""The engine's tokenizer: the HF tokenizer files copied into ENGINE/tokenizer at build time."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from trtc.errors import TrtcError

TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def has_tokenizer(engine_dir: Path) -> bool:
    return any((Path(engine_dir) / "tokenizer" / f).is_file() for f in TOKENIZER_MODEL_FILES)


def load_tokenizer(engine_dir: Path):
    path = Path(engine_dir) / "tokenizer"
    if not has_tokenizer(engine_dir):
        raise TrtcError(f"engine {engine_dir} has no tokenizer; pass token ids, or build from an HF directory with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise TrtcError(f"could not load the tokenizer in {path} ({e}); rebuild the engine from an HF directory with tokenizer files") from None

"""Read a local Hugging Face model directory: config.json and safetensors weights, one slice at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from trtc.errors import TrtcError
from trtc.utils.config_json import read_config_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # a tokenizer needs one of these


def read_config(model_dir: Path) -> dict:
    return read_config_json(model_dir, "model directory", "pass a local HF model directory (config.json + *.safetensors)")


class HFCheckpoint:
    """The weights of an HF directory: names and shapes from the file headers, and `read` of one
    tensor or slice at a time. Each read maps the file only while it copies the slice, so the
    process does not keep the whole checkpoint resident."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.config = read_config(self.model_dir)
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # safetensors dtype codes: F32, BF16, F8_E4M3, U8, I32, ...
        for path, names in self._weight_files().items():
            with self._open(path) as f:
                for name in names if names is not None else f.keys():
                    self._file_of[name] = path
                    self._shapes[name], self._dtypes[name] = self._get_shape(f, name, path)

    def _weight_files(self) -> dict[Path, list[str] | None]:
        """Each weight file with the tensors it should hold (None: whatever its header lists)."""
        d = self.model_dir
        index = d / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise TrtcError(f"{index} is not a valid safetensors index ({e}); fix or re-download it") from None
            files: dict[Path, list[str] | None] = {}
            for name, f in weight_map.items():
                files.setdefault(d / f, []).append(name)
            for f in files:
                if not f.is_file():
                    raise TrtcError(f"weight file {f} listed in {index.name} is missing; re-download the model")
            return files
        shards = sorted(d.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise TrtcError(
                    f"{d} holds only pickle weights ({', '.join(pickles)}), which trtc never loads; "
                    "convert them to safetensors first (model.save_pretrained(dir, safe_serialization=True))"
                )
            raise TrtcError(f"no *.safetensors weight file in {d}; download or save the model weights there")
        return {f: None for f in shards}

    @staticmethod
    def _open(path: Path):
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise TrtcError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it") from None

    @staticmethod
    def _get_shape(f, name: str, path: Path) -> tuple[tuple[int, ...], str]:
        try:
            s = f.get_slice(name)
            return tuple(s.get_shape()), s.get_dtype()
        except Exception:
            raise TrtcError(f"tensor {name} is missing from {path.name}; re-download the model") from None

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype code of tensor `name` (F32, BF16, F8_E4M3, U8, I32, ...)."""
        return self._dtypes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or rows/columns [start, stop) of `dim` (clipped to its size)."""
        path = self._file_of[name]
        index = [slice(None)] * len(self._shapes[name])
        if dim is not None:
            index[dim] = slice(start, stop)
        with self._open(path) as f:
            try:
                return f.get_slice(name)[tuple(index)]  # a copy: valid after the file is closed
            except Exception as e:
                raise TrtcError(
                    f"could not read tensor {name} from {path.name} ({e}); the file is truncated or corrupt, re-download it"
                ) from None

"""Loading an engine directory, with the checks that keep a wrong engine from running."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from trtc import __version__
from trtc.checkpoint import CheckpointConfig, rank_file
from trtc.compiler.build import ENGINE_FORMAT, ENGINE_VERSION, detect_target
from trtc.compiler.build_config import BuildConfig
from trtc.errors import TrtcError


@dataclass
class Engine:
    directory: Path
    pretrained: CheckpointConfig
    build_config: BuildConfig
    target: dict
    backend: str

    @property
    def graph(self):
        return self.pretrained.graph

    @property
    def mapping(self):
        return self.pretrained.mapping

    @classmethod
    def load(cls, directory: str | Path) -> "Engine":
        directory = Path(directory)
        if not directory.is_dir():
            raise TrtcError(f"engine directory {directory} does not exist; build one with `trtc build`")
        path = directory / "config.json"
        if not path.is_file():
            raise TrtcError(f"{path} is missing; --engine_dir must be a directory written by `trtc build`")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TrtcError(f"{path} is not valid JSON ({e}); rebuild the engine") from None
        if not isinstance(d, dict) or d.get("format") != ENGINE_FORMAT:
            raise TrtcError(f"{directory} is not a trtc engine; build one with `trtc build`")
        if d.get("format_version") != ENGINE_VERSION:
            raise TrtcError(
                f"engine {directory} has format version {d.get('format_version')} (trtc {d.get('trtc_version')}), "
                f"this trtc {__version__} runs version {ENGINE_VERSION}; rebuild the engine with this trtc"
            )
        try:
            p = d["pretrained_config"]
            pretrained = CheckpointConfig.from_dict(p)
            return cls(directory, pretrained, BuildConfig(**d["build_config"]), d["target"], d["backend"])
        except (KeyError, TypeError) as e:
            raise TrtcError(f"{path} is incomplete ({e}); rebuild the engine") from None

    def check_runtime(self, world_size: int, device: torch.device) -> None:
        """Refuse to run on another world size or another GPU architecture than built for."""
        if world_size != self.mapping.world_size:
            raise TrtcError(
                f"engine {self.directory} was built for {self.mapping.world_size} ranks (tp "
                f"{self.mapping.tp_size}) but {world_size} process(es) were started; rebuild with --tp {world_size}"
            )
        built = self.target.get("device")
        if built == "cuda":
            here = detect_target()
            if here["device"] != "cuda":
                raise TrtcError(
                    f"engine {self.directory} was built for a GPU of compute capability "
                    f"{self.target['compute_capability']} but this machine has no GPU; rebuild it here"
                )
            if here["compute_capability"] != self.target["compute_capability"]:
                raise TrtcError(
                    f"engine {self.directory} was built for compute capability {self.target['compute_capability']} "
                    f"({self.target.get('gpu_name')}) but this GPU is {here['compute_capability']} "
                    f"({here['gpu_name']}); rebuild the engine on this GPU"
                )

    def load_weights(self, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
        path = rank_file(self.directory, rank, "engine")
        if not path.is_file():
            raise TrtcError(f"{path} is missing; the engine is incomplete, rebuild it")
        try:
            return load_file(str(path), device=str(device))
        except Exception as e:
            raise TrtcError(f"{path} is not a valid engine file ({e}); rebuild the engine") from None

"""The engine directory's format: its name and version in config.json, the target it is built for,
and loading it with the checks that keep a wrong engine from running.

The directory itself is described in trtc/compiler/build.py (cuda backend) and
trtc/backends/tensorrt/__init__.py (tensorrt backend)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig
from trtc.formats.build_id import read_build_id
from trtc.formats.checkpoint import CHECKPOINT_FORMAT, CheckpointConfig, load_weights_file, rank_file
from trtc.utils.config_json import check_format, read_config_json

ENGINE_FORMAT = "trtc-engine"
ENGINE_VERSION = 1


def detect_target() -> dict:
    """What the engine is built for: this machine's GPU architecture, or the CPU."""
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    major, minor = torch.cuda.get_device_capability()
    return {"device": "cuda", "compute_capability": f"{major}.{minor}", "gpu_name": torch.cuda.get_device_name()}


def check_not_other_kind(config: dict, directory: Path) -> None:
    """Refuse a checkpoint or an HF model directory given for an engine, with the command that builds one."""
    if config.get("format") == CHECKPOINT_FORMAT:
        raise TrtcError(f"{directory} is a trtc checkpoint (from `trtc convert` or `trtc quantize`), not an engine; "
                        f"build one: trtc build --checkpoint_dir {directory} --output_dir ENGINE_DIR")
    if "format" not in config and ("architectures" in config or "model_type" in config):
        raise TrtcError(f"{directory} is an HF model directory, not an engine; "
                        f"build one: trtc build --model_dir {directory} --output_dir ENGINE_DIR")


@dataclass
class Engine:
    directory: Path
    pretrained: CheckpointConfig
    build_config: BuildConfig
    target: dict
    backend: str
    tactics: dict = field(default_factory=dict)  # the kernel tactics tuned at build (compiler/autotune.py)
    tensorrt: dict | None = None  # backend tensorrt: the plans' build record; None while only the ONNX exists
    build_id: str | None = None  # None: built before engines carried one
    tuning: dict | None = None  # {"state": "untuned"}: built for a GPU elsewhere, tuned at first load (compiler/tune.py)

    @property
    def graph(self):
        return self.pretrained.graph

    @property
    def mapping(self):
        return self.pretrained.mapping

    @classmethod
    def load(cls, directory: str | Path) -> Engine:
        directory = Path(directory)
        fix = "rebuild the engine with `trtc build`"
        d = read_config_json(directory, "engine directory", fix)
        check_not_other_kind(d, directory)
        check_format(d, directory, ENGINE_FORMAT, ENGINE_VERSION, fix)
        try:
            pretrained = CheckpointConfig.from_dict(d["pretrained_config"])
            return cls(directory, pretrained, BuildConfig(**d["build_config"]), d["target"], d["backend"],
                       d.get("tactics") or {}, d.get("tensorrt"), d.get("build_id"), d.get("tuning"))
        except (KeyError, TypeError) as e:
            raise TrtcError(f"{directory / 'config.json'} is incomplete ({e}); {fix}") from None

    def check_runtime(self, device: torch.device) -> None:
        """Refuse to run on another GPU architecture than built for (the world size is checked
        where the ranks start: trtc/runtime/parallel/launch.py)."""
        built = self.target.get("device")
        if built == "cuda":
            here = detect_target()
            if here["device"] != "cuda":
                raise TrtcError(
                    f"engine {self.directory} was built for a GPU of compute capability "
                    f"{self.target['compute_capability']} but this machine has no GPU; run it on that GPU, or rebuild it here"
                )
            if here["compute_capability"] != self.target["compute_capability"]:
                built_for = self.target.get("gpu_name") or self.target.get("gpu_model") or "built without the GPU"
                raise TrtcError(
                    f"engine {self.directory} was built for compute capability {self.target['compute_capability']} "
                    f"({built_for}) but this GPU is {here['compute_capability']} "
                    f"({here['gpu_name']}); rebuild the engine on this GPU"
                )
            if self.tactics and here["gpu_name"] != self.target.get("gpu_name"):
                raise TrtcError(
                    f"engine {self.directory} holds kernel tactics tuned on a {self.target.get('gpu_name')} but this "
                    f"GPU is a {here['gpu_name']}; rebuild the engine on this GPU"
                )

    def load_weights(self, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
        path = rank_file(self.directory, rank, "engine")
        if self.build_id is not None and path.is_file():
            found = read_build_id(path)
            if found != self.build_id:
                raise TrtcError(
                    f"{path.name} in {self.directory} comes from another build (build id {found}, config.json's "
                    f"is {self.build_id}); rebuild the engine directory"
                )
        return load_weights_file(path, device, "the engine is damaged, rebuild it")

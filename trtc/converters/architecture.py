"""One record per supported HF architecture: how to read its config and where its weights are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trtc.converters.weight_map import WeightMap
from trtc.formats.graph import ModelGraph


@dataclass(frozen=True)
class Architecture:
    name: str  # HF `architectures[0]`
    graph_from_config: Callable[[dict[str, Any]], ModelGraph]
    weights: WeightMap

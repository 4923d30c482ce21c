"""LoRA adapters over one engine, chosen per request: HF PEFT directories (`adapter_config.json` +
`adapter_model.safetensors`) loaded into a fixed number of device slots (`max_loras`, LRU over the
adapters no running request uses), each slot's A and B padded to `max_lora_rank`.

A linear layer of a step with adapter tokens adds, for each adapter in the step, scaling * B (A x) to
the rows of its tokens (shrink, then expand: Punica / S-LoRA's segmented LoRA GEMM, here its PyTorch
reference). Fused engine linears take each part's adapter on its own slice of the output: q, k, v of
`attention.qkv`, gate and up of `mlp.gate_up`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from trtc.errors import TrtcError
from trtc.formats.engine_layout import local_qkv_sizes
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping

# HF module name -> (engine linear, part of its output)
MODULES = {
    "q_proj": ("attention.qkv", 0), "k_proj": ("attention.qkv", 1), "v_proj": ("attention.qkv", 2),
    "o_proj": ("attention.o", 0), "gate_proj": ("mlp.gate_up", 0), "up_proj": ("mlp.gate_up", 1),
    "down_proj": ("mlp.down", 0),
}


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's: an adapter by name (the `model` a server client sends), a unique id, and its PEFT directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    @property
    def salt(self) -> int:
        """The adapter's prefix-cache key: requests share KV blocks only with requests of the same adapter."""
        return int.from_bytes(hashlib.sha256(f"{self.lora_int_id}:{self.lora_name}".encode()).digest()[:8], "little") | 1


def token_groups(seq_slots, query_lens, device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
    """(slot, token rows [t], or None for all of them) of each adapter in a step, from each sequence's slot
    (-1: none) [B] and query lengths [B]."""
    slots = torch.repeat_interleave(torch.as_tensor(seq_slots, dtype=torch.int64),
                                    torch.as_tensor(query_lens, dtype=torch.int64))  # [T]
    present = torch.unique(slots).tolist()
    if len(present) == 1 and present[0] >= 0:  # one adapter for every token
        return [(present[0], None)]
    return [(int(s), torch.nonzero(slots == s).flatten().to(device)) for s in present if s >= 0]


def part_sizes(graph: ModelGraph, mapping: Mapping, layer: int, linear: str) -> list[int]:
    """Output sizes of the parts of an engine linear of `layer` (one part unless fused)."""
    if linear == "attention.qkv":
        return list(local_qkv_sizes(graph, mapping, layer))
    if linear in ("attention.o", "mlp.down"):
        return [graph.hidden_size]
    inter = graph.layers[layer].mlp.intermediate_size // mapping.tp_size
    return [inter, inter] if linear == "mlp.gate_up" else [inter]  # mlp.up of a non-gated MLP


def in_features(graph: ModelGraph, mapping: Mapping, layer: int, linear: str) -> int:
    if linear == "attention.o":
        return local_qkv_sizes(graph, mapping, layer)[0]  # the attention heads' width
    if linear == "mlp.down":
        return graph.layers[layer].mlp.intermediate_size // mapping.tp_size
    return graph.hidden_size


@dataclass
class Adapter:
    """One PEFT adapter on the host: (layer, engine linear) -> {part: (A [r, in], B [out_part, r])}."""

    rank: int
    scaling: float
    weights: dict[tuple[int, str], dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


def load_adapter(path: str | Path, graph: ModelGraph, mapping: Mapping, max_lora_rank: int) -> Adapter:
    """Read and check a PEFT LoRA directory against the engine's model; raise TrtcError naming the problem."""
    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise TrtcError(f"LoRA adapter {path}: no adapter_config.json there; pass a PEFT adapter directory")
    if not weights_file.is_file():
        pickled = (path / "adapter_model.bin").is_file()
        raise TrtcError(f"LoRA adapter {path}: no adapter_model.safetensors"
                        + ("; adapter_model.bin is pickled and not loaded: save it with safetensors" if pickled else ""))
    try:
        cfg = json.loads(config_file.read_text())
        rank, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrtcError(f"LoRA adapter {path}: adapter_config.json is not a PEFT LoRA config with its rank r "
                        f"({type(e).__name__}: {e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise TrtcError(f"LoRA adapter {path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if rank > max_lora_rank:
        raise TrtcError(f"LoRA adapter {path} has rank {rank}, above --max_lora_rank {max_lora_rank}; "
                        f"raise --max_lora_rank to {rank} or more")
    if cfg.get("use_dora") or cfg.get("modules_to_save"):
        raise TrtcError(f"LoRA adapter {path}: DoRA and modules_to_save are not supported; use a plain LoRA adapter")
    if mapping.tp_size != 1:
        raise TrtcError("LoRA adapters run on tp 1 engines for now; rebuild with --tp 1")
    scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    adapter = Adapter(rank, scaling)
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a truncated or foreign file
        raise TrtcError(f"LoRA adapter {path}: adapter_model.safetensors cannot be read ({e}); save the adapter "
                        "again") from None
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        prefix = key.split(".lora_A.")[0]  # base_model.model.model.layers.{i}.self_attn.q_proj
        parts = prefix.split(".")
        module = parts[-1]
        if module not in MODULES or "layers" not in parts:
            raise TrtcError(f"LoRA adapter {path}: module {prefix!r} is not one trtc applies adapters to "
                            f"({', '.join(MODULES)} of the decoder layers)")
        layer = int(parts[parts.index("layers") + 1])
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise TrtcError(f"LoRA adapter {path}: {key} has no lora_B beside it")
        linear, part = MODULES[module]
        if linear == "mlp.gate_up" and not graph.layers[layer].mlp.gated:
            linear, part = "mlp.up", 0
        if layer >= len(graph.layers):
            raise TrtcError(f"LoRA adapter {path}: layer {layer} is past the model's {len(graph.layers)} layers; "
                            "is it an adapter of another base model?")
        want_in, want_out = in_features(graph, mapping, layer, linear), part_sizes(graph, mapping, layer, linear)[part]
        if tuple(a.shape) != (rank, want_in) or tuple(b.shape) != (want_out, rank):
            raise TrtcError(f"LoRA adapter {path}: {prefix} has A {tuple(a.shape)} and B {tuple(b.shape)}, but this "
                            f"model's {module} needs A ({rank}, {want_in}) and B ({want_out}, {rank}); is it an "
                            "adapter of another base model?")
        adapter.weights.setdefault((layer, linear), {})[part] = (a.float(), b.float())
    if not adapter.weights:
        raise TrtcError(f"LoRA adapter {path} holds no lora_A / lora_B weights")
    return adapter


class LoRASlots:
    """`max_loras` device slots of every (layer, linear) an adapter may touch: A [slots, parts, R, in] and
    B [slots, parts, out_part, R] (zero where an adapter leaves a part out), scaling [slots]. Adapters are
    read once into a host cache and copied into a slot when a request needs one; a slot no unfinished
    request uses goes to the least recently used adapter when a new one needs it."""

    def __init__(self, graph: ModelGraph, mapping: Mapping, max_loras: int, max_lora_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        if max_loras < 1 or max_lora_rank < 1:
            raise TrtcError(f"--max_loras {max_loras} / --max_lora_rank {max_lora_rank}: pass at least 1 of each")
        self.graph, self.mapping, self.max_lora_rank = graph, mapping, max_lora_rank
        self.dtype, self.device = dtype, device
        self.a: dict[str, torch.Tensor] = {}  # "layers.{i}.{linear}" -> [slots, parts, R, in]
        self.b: dict[str, torch.Tensor] = {}  # -> [slots, parts, out_part_max, R]
        self.offsets: dict[str, list[int]] = {}  # -> each part's first output column
        for i, layer in enumerate(graph.layers):
            linears = ["attention.qkv", "attention.o", "mlp.gate_up" if layer.mlp.gated else "mlp.up", "mlp.down"]
            if layer.mlp.moe is not None:
                linears = linears[:2]  # the experts take no adapter
            for linear in linears:
                sizes = part_sizes(graph, mapping, i, linear)
                name = f"layers.{i}.{linear}"
                self.a[name] = torch.zeros(max_loras, len(sizes), max_lora_rank, in_features(graph, mapping, i, linear),
                                           dtype=dtype, device=device)
                self.b[name] = torch.zeros(max_loras, len(sizes), max(sizes), max_lora_rank, dtype=dtype, device=device)
                self.offsets[name] = [sum(sizes[:p]) for p in range(len(sizes))] + [sum(sizes)]
        self.scaling = [0.0] * max_loras
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, least recently used first
        self.users = [0] * max_loras  # unfinished requests per slot
        self.host: dict[int, Adapter] = {}

    def acquire(self, request: LoRARequest) -> int:
        """The adapter's slot (loaded if need be) for a new request; release() it when the request ends."""
        rid = request.lora_int_id
        if rid not in self.host:
            self.host[rid] = load_adapter(request.lora_path, self.graph, self.mapping, self.max_lora_rank)
        if rid in self.slot_of:
            slot = self.slot_of.pop(rid)
        else:
            used = set(self.slot_of.values())
            free = [s for s in range(len(self.users)) if s not in used]
            idle = [r for r, s in self.slot_of.items() if self.users[s] == 0]
            if free:
                slot = free[0]
            elif idle:
                slot = self.slot_of.pop(idle[0])  # the least recently used adapter no request holds
            else:
                raise TrtcError(f"all {len(self.users)} LoRA slots hold adapters of unfinished requests; "
                                "raise --max_loras or retry when one ends")
            self._write(slot, self.host[rid])
        self.slot_of[rid] = slot
        self.users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self.users[slot] -= 1

    def _write(self, slot: int, adapter: Adapter) -> None:
        for name in self.a:
            self.a[name][slot].zero_()
            self.b[name][slot].zero_()
        for (layer, linear), parts in adapter.weights.items():
            name = f"layers.{layer}.{linear}"
            for part, (a, b) in parts.items():
                self.a[name][slot, part, : adapter.rank] = a.to(self.dtype)
                self.b[name][slot, part, : b.shape[0], : adapter.rank] = b.to(self.dtype)
        self.scaling[slot] = adapter.scaling

    def add_deltas(self, name: str, x: torch.Tensor, out: torch.Tensor,
                   groups: list[tuple[int, torch.Tensor | None]]) -> torch.Tensor:
        """out [T, N] += each adapter's scaling * B (A x) on its tokens' rows, in place. x: [T, in]; groups:
        (slot, token rows or None for all) of the step's adapters."""
        if name not in self.a:
            return out
        a, b, offsets = self.a[name], self.b[name], self.offsets[name]
        parts, rank = a.shape[1], a.shape[2]
        for slot, rows in groups:
            xs = (x if rows is None else x.index_select(0, rows)).to(self.dtype)  # [t, in]
            shrink = (xs @ a[slot].reshape(parts * rank, -1).T).view(-1, parts, rank)  # every part's A at once
            for part in range(parts):
                lo, hi = offsets[part], offsets[part + 1]
                delta = (shrink[:, part] @ b[slot, part, : hi - lo].T).mul_(self.scaling[slot]).to(out.dtype)
                if rows is None:
                    out[:, lo:hi] += delta  # [T, out_part]
                else:
                    out[:, lo:hi].index_add_(0, rows, delta)
        return out

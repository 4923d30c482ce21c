"""A rank's TensorRT plan, driven like trtc.runtime.model_runner.ModelRunner: the executor and its
C++ scheduler hand it flattened tokens and an AttentionMetadata; it binds them, the KV-cache pools
and the logits buffer to the plan's tensors and enqueues the plan on torch's current stream."""

from __future__ import annotations

import tensorrt as trt
import torch

from trtc.backends.tensorrt import plugins  # noqa: F401  (the plan's plugins must be registered first)
from trtc.backends.tensorrt.profiles import dim_ranges
from trtc.errors import TrtcError
from trtc.formats.build_config import kv_cache_torch_dtype
from trtc.formats.checkpoint import rank_file
from trtc.formats.engine import Engine
from trtc.onnx.lower import LOGITS, NB, POOL_INPUT, POOL_OUTPUT
from trtc.plugins.attention.metadata import AttentionMetadata


class TensorRTRunner:
    """The runtime's model runner (trtc/runtime/runners.py `Runner`) over one rank's TensorRT plan."""

    def __init__(self, engine: Engine, device: torch.device, rank: int = 0) -> None:
        if device.type != "cuda":
            raise TrtcError(f"engine {engine.directory} is a TensorRT engine and runs on a GPU; this run has none")
        self.graph, self.mapping, self.device, self.rank = engine.graph, engine.mapping, device, rank
        self.build_config = engine.build_config
        plan = rank_file(engine.directory, rank, "engine").read_bytes()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        with torch.cuda.device(device):
            self.plan = self.runtime.deserialize_cuda_engine(plan)
            if self.plan is None:
                raise TrtcError(f"TensorRT could not load {rank_file(engine.directory, rank, 'engine')} (another "
                                "TensorRT version or GPU?); rebuild it with `trtc build --from_onnx` here")
            self.context = self.plan.create_execution_context()
        self.plan_bytes = len(plan)
        self.k_cache: list[torch.Tensor] = []  # the pools, [2, N, P, Hkv, D] per layer (K and V stacked)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        most = dim_ranges(self.build_config)[NB][2]
        if num_blocks > most:
            raise TrtcError(f"a KV-cache pool of {num_blocks} blocks exceeds the {most} of the plan's optimization "
                            "profile (max_batch_size x max_seq_len tokens); ask for fewer KV-cache tokens, or rebuild "
                            "with `trtc build --from_onnx` and larger limits")
        kv_dtype = kv_cache_torch_dtype(self.build_config.kv_cache_dtype)
        self.k_cache = [
            torch.zeros((2, num_blocks, self.build_config.tokens_per_block, self.mapping.local_kv_heads(l.attention),
                         l.attention.head_dim), dtype=kv_dtype, device=self.device)
            for l in self.graph.layers
        ]

    def release(self) -> None:
        """Free the pools and the plan now; the runner is unusable after."""
        self.k_cache, self.context, self.plan = [], None, None
        torch.cuda.empty_cache()

    def activation_peak_bytes(self) -> int:
        return 0  # the execution context allocated its activation memory when it was created

    def weight_bytes(self) -> int:
        return self.plan_bytes

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache)

    def graph_capturable(self) -> bool:
        return False  # the plugins are Python callbacks

    def _bind(self, name: str, t: torch.Tensor, is_input: bool = True) -> None:
        if is_input:
            self.context.set_input_shape(name, tuple(t.shape))
        self.context.set_tensor_address(name, t.data_ptr())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor,
                on_logits=None) -> torch.Tensor | None:
        """input_ids: [T]; logits_indices: [S]. Returns logits [S, vocab] float32 (the plan computes
        them whole; with `on_logits` they go to on_logits(0, logits) and None is returned)."""
        step = {
            "input_ids": input_ids.long(), "positions": meta.positions.long(), "slot_mapping": meta.slot_mapping.long(),
            "block_tables": meta.block_tables.int(), "context_lens": meta.context_lens_tensor.int(),
            "query_start_loc": meta.query_start_loc.int(), "logits_indices": logits_indices.long(),
        }
        step = {name: t.to(self.device).contiguous() for name, t in step.items()}  # alive until the step ends
        for name, t in step.items():
            self._bind(name, t)
        for i, pool in enumerate(self.k_cache):  # the attention plugin writes the pool in place
            self._bind(POOL_INPUT.format(i), pool)
            self._bind(POOL_OUTPUT.format(i), pool, is_input=False)
        logits = torch.empty((len(logits_indices), self.graph.vocab_size), dtype=torch.float32, device=self.device)
        self._bind(LOGITS, logits, is_input=False)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise TrtcError("TensorRT failed to run the step (see the log above)")
        if on_logits is not None:
            on_logits(0, logits)
            return None
        return logits

"""The ONNX graphs run by onnxruntime on CPU, with the trtc nodes computed by their reference
implementations (torch_ops.py): the check that the lowering computes what the cuda backend
computes, without TensorRT. `OnnxRuntimeRunner` has the model runner's interface, so the executor
(C++ scheduler, paged KV cache) can drive it step by step.

The trtc nodes become Python custom ops of onnxruntime-extensions. Those register only in its own
domain (`ai.onnx.contrib`; a node of domain `trtc` is "not a registered function/op"), take a
fixed number of inputs, and pass no FP8 tensors; so the session runs a copy of the graph, made in
memory, with the trtc nodes moved to that domain and FP8 tensors (weights, KV-cache pools) typed as
UINT8, which is the same bytes. Nothing else differs from the graph TensorRT parses. onnxruntime's
CPU kernels lack bfloat16 for most ops, so the graph checked is an float32 export of the same
lowering (`write_onnx_dir(..., dtype="float32")`).
"""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto

from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig, kv_cache_torch_dtype
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.onnx import torch_ops
from trtc.onnx.export import PLUGINS_FILE, onnx_files
from trtc.onnx.lower import GRAPH_INPUTS, LOGITS, POOL_INPUT, POOL_OUTPUT
from trtc.onnx.ops import DOMAIN, OPS
from trtc.plugins.attention.metadata import AttentionMetadata

PYOP_DOMAIN = "ai.onnx.contrib"


def _numpy(t: torch.Tensor) -> np.ndarray:
    return (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()


def _torch(a: np.ndarray, fp8: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.array(a))  # a writable copy: the ops write into pools
    return t.view(torch.float8_e4m3fn) if fp8 else t


class ThreadCollectives:
    """NCCL's all-reduce and all-gather for ranks that are threads of this process (each running
    its rank's session), in rank order, so the sum is the same every run."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size)
        self.parts: list[np.ndarray | None] = [None] * world_size

    def exchange(self, rank: int, x: np.ndarray) -> list[np.ndarray]:
        self.parts[rank] = x
        self.barrier.wait()
        parts = list(self.parts)
        self.barrier.wait()  # nobody overwrites a part before every rank has read them
        return parts


_collectives: ThreadCollectives | None = None


@functools.cache
def register_ops() -> str:
    """Register the trtc ops as onnxruntime-extensions Python ops; returns the library to load."""
    from onnxruntime_extensions import PyOp, get_library_path, onnx_op

    f32, i32, i64, u8, any_ = PyOp.dt_float, PyOp.dt_int32, PyOp.dt_int64, PyOp.dt_uint8, PyOp.undefined

    def attrs(name: str) -> dict[str, int]:
        return {a.name: i64 if a.type == "int" else f32 for a in OPS[name].attributes}

    # the pool is the one input of either type (float32, or FP8 as uint8); its output takes that type
    @onnx_op(op_type="PagedAttention", inputs=[f32, f32, f32, any_, f32, f32, i64, i32, i32, i32],
             outputs=[f32, any_], attrs=attrs("PagedAttention"))
    def paged_attention(qkv, cos, sin, pool, k_scale, v_scale, slots, block_tables, context_lens, query_start_loc, **kw):
        fp8 = pool.dtype == np.uint8
        pool_t = _torch(pool, fp8)
        out = torch_ops.paged_attention(
            _torch(qkv), _torch(cos), _torch(sin), pool_t, _torch(k_scale), _torch(v_scale), _torch(slots),
            _torch(block_tables), _torch(context_lens), _torch(query_start_loc), **kw)
        return out.numpy(), _numpy(pool_t)

    @onnx_op(op_type="Fp8Gemm", inputs=[f32, u8, f32, f32], outputs=[f32], attrs=attrs("Fp8Gemm"))
    def fp8_gemm(x, weight, weight_scale, input_scale):
        return torch_ops.fp8_gemm(_torch(x), _torch(weight, fp8=True), _torch(weight_scale), _torch(input_scale)).numpy()

    @onnx_op(op_type="W4A16Gemm", inputs=[f32, u8, f32, u8], outputs=[f32], attrs=attrs("W4A16Gemm"))
    def w4a16_gemm(x, weight, weight_scale, weight_zero, **kw):
        return torch_ops.w4a16_gemm(_torch(x), _torch(weight), _torch(weight_scale), _torch(weight_zero), **kw).numpy()

    # gate_up and down: the activation type, or FP8 as uint8
    @onnx_op(op_type="MoE", inputs=[f32, f32, i64, any_, f32, f32, any_, f32, f32], outputs=[f32], attrs=attrs("MoE"))
    def moe(x, topk_weights, topk_ids, gate_up, gate_up_scale, gate_up_input_scale, down, down_scale, down_input_scale):
        fp8 = gate_up.dtype == np.uint8
        return torch_ops.moe(_torch(x), _torch(topk_weights), _torch(topk_ids), _torch(gate_up, fp8),
                             _torch(gate_up_scale), _torch(gate_up_input_scale), _torch(down, fp8), _torch(down_scale),
                             _torch(down_input_scale)).numpy()

    @onnx_op(op_type="AllReduce", inputs=[f32], outputs=[f32], attrs=attrs("AllReduce"))
    def all_reduce(x, tp_size, rank):
        parts = _collectives.exchange(rank, x)
        total = parts[0].copy()
        for part in parts[1:]:
            total += part
        return total

    @onnx_op(op_type="AllGather", inputs=[f32], outputs=[f32], attrs=attrs("AllGather"))
    def all_gather(x, tp_size, rank):
        return np.concatenate(_collectives.exchange(rank, x), axis=-1)

    return get_library_path()


def session_model(path: Path) -> onnx.ModelProto:
    """The graph at `path` (weights loaded) as onnxruntime runs it: see the module docstring."""
    model = onnx.load(str(path), load_external_data=True)
    g = model.graph
    for node in g.node:
        if node.domain == DOMAIN:
            node.domain = PYOP_DOMAIN
            keep = [a for a in node.attribute if a.name != "plugin_namespace"]
            del node.attribute[:]
            node.attribute.extend(keep)
    for t in g.initializer:
        if t.data_type == TensorProto.FLOAT8E4M3FN:
            t.data_type = TensorProto.UINT8
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT8E4M3FN:
            v.type.tensor_type.elem_type = TensorProto.UINT8
    for opset in model.opset_import:
        if opset.domain == DOMAIN:
            opset.domain = PYOP_DOMAIN
    return model


class OnnxRuntimeRunner:
    """One rank's ONNX graph in onnxruntime, driven like trtc.runtime.model_runner.ModelRunner."""

    def __init__(self, onnx_dir: Path, graph: ModelGraph, mapping: Mapping, build_config: BuildConfig,
                 rank: int = 0) -> None:
        import onnxruntime as ort

        meta = json.loads((Path(onnx_dir) / PLUGINS_FILE).read_text())
        if meta["activation_dtype"] != "float32":
            raise TrtcError(f"{onnx_dir} holds {meta['activation_dtype']} graphs, which onnxruntime's CPU kernels do "
                            "not run; export them with dtype float32 for the check")
        self.graph, self.mapping, self.build_config, self.rank = graph, mapping, build_config, rank
        options = ort.SessionOptions()
        options.register_custom_ops_library(register_ops())
        model = session_model(Path(onnx_dir) / onnx_files(rank)[0])
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        self.weight_nbytes = sum(len(t.raw_data) for t in model.graph.initializer)
        self.pools: list[np.ndarray] = []
        self.k_cache: list = []  # the executor's close() clears these three
        self.v_cache: list = []
        self.w: dict = {}

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Per layer: [2, num_blocks, tokens_per_block, local_kv_heads, head_dim] (FP8 as its bytes)."""
        fp8 = kv_cache_torch_dtype(self.build_config.kv_cache_dtype) == torch.float8_e4m3fn
        dtype = np.uint8 if fp8 else np.float32
        self.pools = [
            np.zeros((2, num_blocks, self.build_config.tokens_per_block, self.mapping.local_kv_heads(l.attention),
                      l.attention.head_dim), dtype=dtype)
            for l in self.graph.layers
        ]

    def weight_bytes(self) -> int:
        return self.weight_nbytes

    def kv_cache_bytes(self) -> int:
        return sum(p.nbytes for p in self.pools)

    def graph_capturable(self) -> bool:
        return False

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids: [T]; logits_indices: [S]. Returns logits [S, vocab] float32."""
        step = {
            "input_ids": input_ids, "positions": meta.positions, "slot_mapping": meta.slot_mapping,
            "block_tables": meta.block_tables, "context_lens": meta.context_lens_tensor,
            "query_start_loc": meta.query_start_loc, "logits_indices": logits_indices,
        }
        feed = {name: step[name].cpu().numpy().astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
                for name, (elem, _) in GRAPH_INPUTS.items()}
        feed.update({POOL_INPUT.format(i): pool for i, pool in enumerate(self.pools)})
        names = [LOGITS] + [POOL_OUTPUT.format(i) for i in range(len(self.pools))]
        logits, *self.pools = self.session.run(names, feed)
        return torch.from_numpy(logits)


class TensorParallelOnnxRuntimeRunner:
    """Every rank's graph in its own thread, the collectives between them through
    ThreadCollectives; the logits are rank 0's (each rank has them all after the gather)."""

    def __init__(self, onnx_dir: Path, graph: ModelGraph, mapping: Mapping, build_config: BuildConfig) -> None:
        self.ranks = [OnnxRuntimeRunner(onnx_dir, graph, mapping, build_config, r) for r in range(mapping.world_size)]
        self.pool = ThreadPoolExecutor(mapping.world_size)
        self.collectives = ThreadCollectives(mapping.world_size)
        self.k_cache: list = []
        self.v_cache: list = []
        self.w: dict = {}

    def allocate_kv_cache(self, num_blocks: int) -> None:
        for r in self.ranks:
            r.allocate_kv_cache(num_blocks)

    def weight_bytes(self) -> int:
        return sum(r.weight_bytes() for r in self.ranks)

    def kv_cache_bytes(self) -> int:
        return sum(r.kv_cache_bytes() for r in self.ranks)

    def graph_capturable(self) -> bool:
        return False

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        global _collectives
        _collectives = self.collectives
        logits = list(self.pool.map(lambda r: r.forward(input_ids, meta, logits_indices), self.ranks))
        return logits[0]

"""The trtc ONNX ops (trtc/onnx/ops.py) as TensorRT plugins, with TensorRT's Python plugin API
(`tensorrt.plugin`, TensorRT >= 10.8). Importing this module registers them as `trtc::{name}`,
which TensorRT's ONNX parser finds from a node's op type and its `plugin_namespace` attribute; the
builder and the runtime import it before parsing or deserializing.

Each `impl` runs trtc's own code on the engine's buffers through torch, on TensorRT's stream:
trtc/onnx/torch_ops.py, i.e. the same dispatch the cuda backend uses (Triton kernels for
bf16/fp16 CUDA tensors: RoPE fused with the KV write, varlen paged attention; the references for
the FP8 KV cache and the quantized GEMMs until their kernels land). They are JIT implementations
(`trtp.impl`), so a plan needs Python and trtc to run; an AOT one (`trtp.aot_impl`) compiles a single
Triton kernel to PTX per plugin, while PagedAttention launches two to four.

The KV-cache pool is updated in place: output 1 of PagedAttention is aliased to input 3
(`TensorDesc.aliased`, which needs the builder's preview feature ALIASED_PLUGIN_IO_10_03).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from trtc.onnx import torch_ops

# TensorRT type -> (the array-interface type of its bytes, the torch dtype they are viewed as).
# tensorrt.plugin.Tensor has no __cuda_array_interface__ for BF16 and FP8, so every buffer is
# wrapped through its raw bytes.
_TYPES: dict[Any, tuple[str, torch.dtype]] = {
    trt.DataType.FLOAT: ("<f4", torch.float32),
    trt.DataType.HALF: ("<f2", torch.float16),
    trt.DataType.BF16: ("<u2", torch.bfloat16),
    trt.DataType.FP8: ("|u1", torch.float8_e4m3fn),
    trt.DataType.UINT8: ("|u1", torch.uint8),
    trt.DataType.INT32: ("<i4", torch.int32),
    trt.DataType.INT64: ("<i8", torch.int64),
}


class _Buffer:
    def __init__(self, t: trtp.Tensor, typestr: str) -> None:
        itemsize = np.dtype(typestr).itemsize
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": typestr, "data": (t.data_ptr, False), "version": 3,
            "strides": tuple(s * itemsize for s in t.strides) if t.strides is not None else None,
        }


def as_torch(t: trtp.Tensor) -> torch.Tensor:
    """A torch view of a plugin buffer (no copy)."""
    typestr, dtype = _TYPES[t.dtype]
    view = torch.as_tensor(_Buffer(t, typestr), device="cuda")
    return view if view.dtype == dtype else view.view(dtype)


def _on(stream: int):
    return torch.cuda.stream(torch.cuda.ExternalStream(stream))


# PagedAttention ------------------------------------------------------------------------------------
@trtp.register("trtc::PagedAttention")
def _paged_attention_desc(
    qkv: trtp.TensorDesc, rope_cos: trtp.TensorDesc, rope_sin: trtp.TensorDesc, kv_cache_pool: trtp.TensorDesc,
    k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc, slot_mapping: trtp.TensorDesc, block_tables: trtp.TensorDesc,
    context_lens: trtp.TensorDesc, query_start_loc: trtp.TensorDesc, num_heads: int, num_kv_heads: int, head_dim: int,
    tokens_per_block: int, scale: float, sliding_window: int, soft_cap: float,
) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
    out = trtp.from_shape_expr((qkv.shape_expr[0], num_heads * head_dim), dtype=qkv.dtype)  # [T, Hq D]
    return out, kv_cache_pool.aliased()


@trtp.impl("trtc::PagedAttention")
def _paged_attention_impl(
    qkv: trtp.Tensor, rope_cos: trtp.Tensor, rope_sin: trtp.Tensor, kv_cache_pool: trtp.Tensor, k_scale: trtp.Tensor,
    v_scale: trtp.Tensor, slot_mapping: trtp.Tensor, block_tables: trtp.Tensor, context_lens: trtp.Tensor,
    query_start_loc: trtp.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
    scale: float, sliding_window: int, soft_cap: float, outputs: tuple[trtp.Tensor, ...], stream: int,
) -> None:
    with _on(stream):
        inputs = [as_torch(t) for t in (qkv, rope_cos, rope_sin, kv_cache_pool, k_scale, v_scale, slot_mapping,
                                        block_tables, context_lens, query_start_loc)]
        out = torch_ops.paged_attention(
            *inputs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            tokens_per_block=tokens_per_block, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
        as_torch(outputs[0]).copy_(out)  # outputs[1] is the pool itself, written in place


# Quantized GEMMs -----------------------------------------------------------------------------------
@trtp.register("trtc::Fp8Gemm")
def _fp8_gemm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, weight_scale: trtp.TensorDesc,
                   input_scale: trtp.TensorDesc) -> trtp.TensorDesc:
    return trtp.from_shape_expr((x.shape_expr[0], weight.shape_expr[0]), dtype=x.dtype)  # [M, out]


@trtp.impl("trtc::Fp8Gemm")
def _fp8_gemm_impl(x: trtp.Tensor, weight: trtp.Tensor, weight_scale: trtp.Tensor, input_scale: trtp.Tensor,
                   outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    with _on(stream):
        y = torch_ops.fp8_gemm(as_torch(x), as_torch(weight), as_torch(weight_scale), as_torch(input_scale))
        as_torch(outputs[0]).copy_(y)


@trtp.register("trtc::W4A16Gemm")
def _w4a16_gemm_desc(x: trtp.TensorDesc, weight: trtp.TensorDesc, weight_scale: trtp.TensorDesc,
                     weight_zero: trtp.TensorDesc, group_size: int) -> trtp.TensorDesc:
    return trtp.from_shape_expr((x.shape_expr[0], weight.shape_expr[0]), dtype=x.dtype)  # [M, out]


@trtp.impl("trtc::W4A16Gemm")
def _w4a16_gemm_impl(x: trtp.Tensor, weight: trtp.Tensor, weight_scale: trtp.Tensor, weight_zero: trtp.Tensor,
                     group_size: int, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    with _on(stream):
        y = torch_ops.w4a16_gemm(as_torch(x), as_torch(weight), as_torch(weight_scale), as_torch(weight_zero),
                                     group_size=group_size)
        as_torch(outputs[0]).copy_(y)


# Mixture of experts ---------------------------------------------------------------------------------
@trtp.register("trtc::MoE")
def _moe_desc(x: trtp.TensorDesc, topk_weights: trtp.TensorDesc, topk_ids: trtp.TensorDesc, gate_up: trtp.TensorDesc,
              gate_up_scale: trtp.TensorDesc, gate_up_input_scale: trtp.TensorDesc, down: trtp.TensorDesc,
              down_scale: trtp.TensorDesc, down_input_scale: trtp.TensorDesc) -> trtp.TensorDesc:
    return x.like()  # [T, hidden]


@trtp.impl("trtc::MoE")
def _moe_impl(x: trtp.Tensor, topk_weights: trtp.Tensor, topk_ids: trtp.Tensor, gate_up: trtp.Tensor,
              gate_up_scale: trtp.Tensor, gate_up_input_scale: trtp.Tensor, down: trtp.Tensor, down_scale: trtp.Tensor,
              down_input_scale: trtp.Tensor, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    with _on(stream):
        y = torch_ops.moe(*(as_torch(t) for t in (x, topk_weights, topk_ids, gate_up, gate_up_scale,
                                                  gate_up_input_scale, down, down_scale, down_input_scale)))
        as_torch(outputs[0]).copy_(y)


# Tensor-parallel collectives (torch.distributed's NCCL group of the ranks' processes) --------------
@trtp.register("trtc::AllReduce")
def _all_reduce_desc(x: trtp.TensorDesc, tp_size: int, rank: int) -> trtp.TensorDesc:
    return x.like()


@trtp.impl("trtc::AllReduce")
def _all_reduce_impl(x: trtp.Tensor, tp_size: int, rank: int, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    with _on(stream):
        y = as_torch(outputs[0])
        y.copy_(as_torch(x))
        torch.distributed.all_reduce(y)


@trtp.register("trtc::AllGather")
def _all_gather_desc(x: trtp.TensorDesc, tp_size: int, rank: int) -> trtp.TensorDesc:
    return trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1] * tp_size), dtype=x.dtype)


@trtp.impl("trtc::AllGather")
def _all_gather_impl(x: trtp.Tensor, tp_size: int, rank: int, outputs: tuple[trtp.Tensor, ...], stream: int) -> None:
    with _on(stream):
        parts = [torch.empty_like(as_torch(x)) for _ in range(tp_size)]
        torch.distributed.all_gather(parts, as_torch(x).contiguous())
        as_torch(outputs[0]).copy_(torch.cat(parts, dim=-1))

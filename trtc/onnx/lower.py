"""One rank's layer graph lowered to ONNX: standard ops for embedding, norms, RoPE, MLP and the
model-dtype GEMMs; `trtc` nodes (ops.py) for paged attention, the quantized GEMMs and the
tensor-parallel collectives. It computes what the model runner (trtc/runtime/model_runner.py)
computes, op for op, over the engine's tensors (fused qkv / gate_up, kernel layout).

The graph's inputs and outputs are one runtime step (see GRAPH_INPUTS); the KV-cache pool of layer
i is the input `kv_cache_pool.{i}` and the output `present_kv_cache_pool.{i}`, which the attention
node writes in place (ONNX values are immutable, so the update is an output aliased to the input:
TensorRT's plugin aliases the two buffers, a runtime binds both names to the same memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from trtc.errors import TrtcError
from trtc.formats.build_config import BuildConfig, kv_cache_torch_dtype
from trtc.formats.engine_layout import local_qkv_sizes
from trtc.formats.graph import ModelGraph, NormConfig, RopeConfig
from trtc.formats.mapping import Mapping
from trtc.onnx.graph_builder import ONNX_TYPE, GraphBuilder
from trtc.plugins.attention.rope import inv_freq

T, B, B1, S, NB, MB = "num_tokens", "num_seqs", "num_seqs_plus_one", "num_logits", "num_blocks", "max_blocks_per_seq"
# name -> (ONNX type, dims): one step of the runtime, as AttentionMetadata carries it
GRAPH_INPUTS = {
    "input_ids": (TensorProto.INT64, [T]),
    "positions": (TensorProto.INT64, [T]),
    "slot_mapping": (TensorProto.INT64, [T]),
    "block_tables": (TensorProto.INT32, [B, MB]),
    "context_lens": (TensorProto.INT32, [B]),
    "query_start_loc": (TensorProto.INT32, [B1]),
    "logits_indices": (TensorProto.INT64, [S]),
}
POOL_INPUT, POOL_OUTPUT, LOGITS = "kv_cache_pool.{}", "present_kv_cache_pool.{}", "logits"


@dataclass
class RankSpec:
    """What one rank's graph is lowered from: the tensors' (dtype, shape) by engine name, and the
    activation dtype (the model's, or float32 for an export that runs where bf16 kernels lack)."""

    graph: ModelGraph
    mapping: Mapping
    rank: int
    build_config: BuildConfig
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    dtype: torch.dtype


def pool_dims(graph: ModelGraph, mapping: Mapping, bc: BuildConfig, layer: int) -> list[int | str]:
    """Layer `layer`'s KV-cache pool: K and V stacked, each a contiguous paged cache."""
    a = graph.layers[layer].attention
    return [2, NB, bc.tokens_per_block, mapping.local_kv_heads(a), a.head_dim]


class Lowering:
    def __init__(self, spec: RankSpec) -> None:
        self.s, self.g = spec, GraphBuilder()
        self.act = ONNX_TYPE[spec.dtype]
        self.kv = ONNX_TYPE[kv_cache_torch_dtype(spec.build_config.kv_cache_dtype)]
        if self.kv != TensorProto.FLOAT8E4M3FN:
            self.kv = self.act  # the pool holds activations (an fp32 export of a bf16 model: fp32)
        self._rope: dict[tuple, tuple[str, str]] = {}

    def run(self) -> GraphBuilder:
        g, graph = self.g, self.s.graph
        for name, (elem, dims) in GRAPH_INPUTS.items():
            g.input(name, elem, dims)
        for i in range(graph.num_layers):
            g.input(POOL_INPUT.format(i), self.kv, self.pool_dims(i))
        h, residual = self.embed(), None  # h: [T, hidden]
        for i, layer in enumerate(graph.layers):
            p = f"layers.{i}."
            g.scope = f"layers.{i}/input_norm"
            x, residual = self.add_norm(h, residual, layer.input_norm, p + "input_norm")
            g.scope = f"layers.{i}/attention"
            h = self.attention(i, x)
            if layer.attention_output_norm is not None:
                g.scope = f"layers.{i}/attention_output_norm"
                h = self.norm(h, layer.attention_output_norm, p + "attention_output_norm.weight")
            g.scope = f"layers.{i}/post_attention_norm"
            x, residual = self.add_norm(h, residual, layer.post_attention_norm, p + "post_attention_norm")
            g.scope = f"layers.{i}/mlp"
            h = self.mlp(i, x)
            if layer.mlp_output_norm is not None:
                g.scope = f"layers.{i}/mlp_output_norm"
                h = self.norm(h, layer.mlp_output_norm, p + "mlp_output_norm.weight")
        g.scope = "lm_head"
        h = g.op("Gather", [h, "logits_indices"], axis=0)  # [S, hidden]
        residual = g.op("Gather", [residual, "logits_indices"], axis=0)
        h, _ = self.add_norm(h, residual, graph.final_norm, "final_norm")
        head = "embedding.weight" if graph.tie_word_embeddings else "lm_head.weight"
        logits = self.cast(g.op("Gemm", [h, head], transB=1), TensorProto.FLOAT)  # [S, local_vocab]
        if graph.final_logit_soft_cap is not None:
            cap = g.const(graph.final_logit_soft_cap, np.float32)
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap])]), cap])
        vocab = self._rows(head) * self.s.mapping.tp_size  # padded to a multiple of tp
        if self.s.mapping.tp_size > 1:
            logits = self.collective("AllGather", logits, TensorProto.FLOAT, [S, vocab])
        if vocab != graph.vocab_size:
            logits = g.op("Slice", [logits, g.const([0]), g.const([graph.vocab_size]), g.const([1])])
        g.op("Identity", [logits], out_names=[LOGITS])
        g.output(LOGITS, TensorProto.FLOAT, [S, graph.vocab_size])
        return g

    # helpers ------------------------------------------------------------------------------------
    def pool_dims(self, i: int) -> list[int | str]:
        return pool_dims(self.s.graph, self.s.mapping, self.s.build_config, i)

    def _rows(self, name: str) -> int:
        return self.s.tensors[name][1][0]

    def has(self, name: str) -> bool:
        return name in self.s.tensors

    def cast(self, x: str, to: int, have: int | None = None) -> str:
        """x (of the activation dtype, or `have`) as `to`; no node when it already is."""
        return x if (self.act if have is None else have) == to else self.g.op("Cast", [x], to=to)

    def collective(self, op: str, x: str, elem: int, dims: list) -> str:
        m = self.s.mapping
        return self.g.typed(self.g.trtc_op(op, [x], tp_size=m.tp_size, rank=self.s.rank), elem, dims)

    def all_reduce(self, x: str) -> str:
        if self.s.mapping.tp_size == 1:
            return x
        return self.collective("AllReduce", x, self.act, [T, self.s.graph.hidden_size])

    # layers -------------------------------------------------------------------------------------
    def embed(self) -> str:
        g, m = self.g, self.s.mapping
        self.g.scope = "embedding"
        if m.tp_size == 1:
            return self.scale_embedding(g.op("Gather", ["embedding.weight", "input_ids"], axis=0))
        rows = self._rows("embedding.weight")  # vocab-parallel: ids outside this rank's rows give zeros
        local = g.op("Sub", ["input_ids", g.const(self.s.rank * rows)])
        inside = g.op("And", [g.op("GreaterOrEqual", [local, g.const(0)]), g.op("Less", [local, g.const(rows)])])
        h = g.op("Gather", ["embedding.weight", g.op("Clip", [local, g.const(0), g.const(rows - 1)])], axis=0)
        h = g.op("Mul", [h, g.op("Unsqueeze", [g.op("Cast", [inside], to=self.act), g.const([1])])])
        return self.scale_embedding(self.all_reduce(h))

    def scale_embedding(self, h: str) -> str:
        scale = self.s.graph.embedding_scale
        return h if scale is None else self.g.op("Mul", [h, self.g.const(scale, np.float32, elem_type=self.act)])

    def add_norm(self, x: str, residual: str | None, cfg: NormConfig | None, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual); the add in the activation dtype, as the runner does;
        cfg None: no norm."""
        h = x if residual is None else self.g.op("Add", [x, residual])
        if cfg is None:
            return h, h
        return self.norm(h, cfg, name + ".weight", name + ".bias" if cfg.bias else None), h

    def norm(self, x: str, cfg: NormConfig, weight: str, bias: str | None = None, eps: float | None = None) -> str:
        """RMSNorm / LayerNorm in float32, cast back, times (offset + weight) in the activation dtype."""
        g = self.g
        eps = cfg.eps if eps is None else eps
        w = self.cast_act(weight)
        if cfg.offset:
            w = g.op("Add", [w, g.const(cfg.offset, np.float32, elem_type=self.act)])
        xf = self.cast(x, TensorProto.FLOAT)
        if cfg.kind == "rms":
            ms = g.op("ReduceMean", [g.op("Mul", [xf, xf]), g.const([-1])], keepdims=1)
            y = g.op("Mul", [xf, g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [ms, g.const(eps, np.float32)])])])])
            return g.op("Mul", [w, self.cast(y, self.act, TensorProto.FLOAT)])
        ins = [xf, self.cast(w, TensorProto.FLOAT)] + ([self.cast(self.cast_act(bias), TensorProto.FLOAT)] if bias else [])
        return self.cast(g.op("LayerNormalization", ins, axis=-1, epsilon=eps), self.act, TensorProto.FLOAT)

    def cast_act(self, name: str) -> str:
        """A model-dtype tensor in the activation dtype (a no-op unless the export's dtype differs)."""
        return self.cast(name, self.act, ONNX_TYPE[self.s.tensors[name][0]])

    def linear(self, x: str, name: str, bias: bool = True) -> str:
        """x: [T, in] -> [T, out]; the kind of GEMM follows from the layer's tensors, as in
        trtc/plugins/gemm/linear.py."""
        g, t = self.g, self.s.tensors
        out = self._rows(name + ".weight")
        b = name + ".bias" if bias and self.has(name + ".bias") else None
        if not self.has(name + ".weight_scale"):
            return g.op("Gemm", [x, name + ".weight"] + ([b] if b else []), transB=1)
        if self.has(name + ".input_scale"):
            y = g.trtc_op("Fp8Gemm", [x, name + ".weight", name + ".weight_scale", name + ".input_scale"])
        else:
            if self.has(name + ".pre_quant_scale"):
                x = g.op("Mul", [x, self.cast(name + ".pre_quant_scale", self.act, TensorProto.FLOAT)])
            if self.has(name + ".input_perm"):
                x = g.op("Gather", [x, name + ".input_perm"], axis=1)
            zero = name + ".weight_zero" if self.has(name + ".weight_zero") else g.const(8, np.uint8)
            group = 2 * t[name + ".weight"][1][1] // t[name + ".weight_scale"][1][1]
            y = g.trtc_op("W4A16Gemm", [x, name + ".weight", name + ".weight_scale", zero], group_size=group)
        g.typed(y, self.act, [T, out])
        return g.op("Add", [y, b]) if b else y

    def rope(self, i: int) -> tuple[str, str]:
        """cos, sin [T, R] of each token's angles positions * inv_freq, once per RoPE kind; R < D for
        a partial rotary (the attention op rotates the first R dims of a head). A layer without RoPE
        has zero frequencies (cos 1, sin 0: the identity)."""
        a = self.s.graph.layers[i].attention
        key = (repr(a.rope), a.rope_dim, a.head_dim, a.use_rope)
        if key not in self._rope:
            g, scope = self.g, self.g.scope
            g.scope = "rope"
            pos = g.op("Unsqueeze", [g.op("Cast", ["positions"], to=TensorProto.FLOAT), g.const([1])])  # [T, 1]
            if not a.use_rope:
                freq = g.const(np.zeros((1, a.head_dim // 2), np.float32), np.float32)
            elif a.rope.type == "dynamic":
                freq = self.dynamic_inv_freq(a.rope, a.head_dim)
            elif a.rope.type == "longrope":
                freq = self.longrope_inv_freq(a.rope, a.rope_dim)
            else:
                freq = g.const(inv_freq(a.rope, a.rope_dim).numpy()[None, :], np.float32)  # [1, R/2]
            angles = g.op("Mul", [pos, freq])
            emb = g.op("Concat", [angles, angles], axis=1)  # [T, R]
            cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
            if a.use_rope and a.rope.attention_factor != 1.0:
                factor = g.const(a.rope.attention_factor, np.float32)
                cos, sin = g.op("Mul", [cos, factor]), g.op("Mul", [sin, factor])
            self._rope[key] = tuple(self.cast(c, self.act, TensorProto.FLOAT) for c in (cos, sin))
            g.scope = scope
        return self._rope[key]

    def longrope_inv_freq(self, rope: RopeConfig, rotary_dim: int) -> str:
        """LongRoPE: the long factors once the step's longest sequence (max position + 1) exceeds
        original_max_position_embeddings, the short ones before (trtc/plugins/attention/rope.py)."""
        g = self.g
        n = g.op("Add", [g.op("ReduceMax", ["positions"], keepdims=0), g.const(1)])  # []
        short = inv_freq(rope, rotary_dim, 0).numpy()[None, :]
        long = inv_freq(rope, rotary_dim, rope.original_max_position_embeddings + 1).numpy()[None, :]
        past = g.op("Greater", [n, g.const(rope.original_max_position_embeddings)])
        return g.op("Where", [past, g.const(long, np.float32), g.const(short, np.float32)])

    def dynamic_inv_freq(self, rope: RopeConfig, head_dim: int) -> str:
        """Dynamic NTK: the base grows once the step's longest sequence (max position + 1) exceeds
        max_position_embeddings (trtc/plugins/attention/rope.py)."""
        g, f, mpe = self.g, rope.factor, float(self.s.graph.max_position_embeddings)
        theta = g.const(rope.theta, np.float32)
        n = g.op("Add", [g.op("ReduceMax", ["positions"], keepdims=0), g.const(1)])  # []
        n = g.op("Cast", [n], to=TensorProto.FLOAT)
        grown = g.op("Sub", [g.op("Mul", [n, g.const(f / mpe, np.float32)]), g.const(f - 1, np.float32)])
        scaled = g.op("Mul", [theta, g.op("Pow", [grown, g.const(head_dim / (head_dim - 2), np.float32)])])
        base = g.op("Where", [g.op("Greater", [n, g.const(mpe, np.float32)]), scaled, theta])
        exponents = np.arange(0, head_dim, 2, dtype=np.float32)[None, :] / head_dim
        return g.op("Reciprocal", [g.op("Pow", [base, g.const(exponents, np.float32)])])

    def attention(self, i: int, x: str) -> str:
        g, a, p = self.g, self.s.graph.layers[i].attention, f"layers.{i}.attention."
        m = self.s.mapping
        hq, hkv, d = m.local_heads(a), m.local_kv_heads(a), a.head_dim
        qkv = self.linear(x, p + "qkv")  # [T, (Hq + 2 Hkv) D]
        if a.qk_norm:
            sizes = g.const(list(local_qkv_sizes(self.s.graph, m, i)))
            q, k, v = g.op("Split", [qkv, sizes], num_outputs=3, axis=1)
            q = self.head_norm(q, hq, d, p + "q_norm.weight", a.qk_norm_eps, a.qk_norm_offset)
            k = self.head_norm(k, hkv, d, p + "k_norm.weight", a.qk_norm_eps, a.qk_norm_offset)
            qkv = g.op("Concat", [q, k, v], axis=1)
        cos, sin = self.rope(i)
        if self.kv == TensorProto.FLOAT8E4M3FN:
            k_scale, v_scale = p + "k_cache_scale", p + "v_cache_scale"
        else:
            k_scale = v_scale = g.const(1.0, np.float32)
        out, _ = g.trtc_op(
            "PagedAttention",
            [qkv, cos, sin, POOL_INPUT.format(i), k_scale, v_scale, "slot_mapping", "block_tables", "context_lens",
             "query_start_loc"],
            out_names=[f"layers.{i}.attention.out", POOL_OUTPUT.format(i)],
            num_heads=hq, num_kv_heads=hkv, head_dim=d, tokens_per_block=self.s.build_config.tokens_per_block,
            scale=float(a.softmax_scale), sliding_window=a.sliding_window or 0, soft_cap=float(a.soft_cap or 0.0),
        )
        g.typed(out, self.act, [T, hq * d])
        g.output(POOL_OUTPUT.format(i), self.kv, self.pool_dims(i))
        h = self.all_reduce(self.linear(out, p + "o", bias=False))
        return g.op("Add", [h, p + "o.bias"]) if a.o_bias else h

    def head_norm(self, x: str, heads: int, head_dim: int, weight: str, eps: float, offset: float = 0.0) -> str:
        """Per-head RMSNorm (q/k norm): x [T, heads * D] -> [T, heads, D], normed, back."""
        g = self.g
        cfg = NormConfig("rms", offset=offset)
        y = self.norm(g.op("Reshape", [x, g.const([0, heads, head_dim])]), cfg, weight, eps=eps)
        return g.op("Reshape", [y, g.const([0, heads * head_dim])])

    def mlp(self, i: int, x: str) -> str:
        g, mlp, p = self.g, self.s.graph.layers[i].mlp, f"layers.{i}.mlp."
        if mlp.moe is not None:
            return self.all_reduce(self.moe(i, x))
        if mlp.gated:
            half = self._rows(p + "gate_up.weight") // 2
            sizes = g.const([half, half])
            gate, up = g.op("Split", [self.linear(x, p + "gate_up"), sizes], num_outputs=2, axis=1)  # [T, I] each
            y = g.op("Mul", [self.activation(gate, mlp.activation), up])
        else:
            y = self.activation(self.linear(x, p + "up"), mlp.activation)
        h = self.all_reduce(self.linear(y, p + "down", bias=False))
        return g.op("Add", [h, p + "down.bias"]) if mlp.bias else h

    def moe(self, i: int, x: str) -> str:
        """The router in standard ops (float32 Softmax over the experts, TopK, renormalisation), the
        experts in one MoE node, the shared expert as a dense gated MLP: this rank's partial [T, hidden]."""
        g, mlp, p = self.g, self.s.graph.layers[i].mlp, f"layers.{i}.mlp."
        moe = mlp.moe
        if mlp.activation != "silu" or self.has(p + "experts.gate_up.weight_zero") or (
                self.has(p + "experts.gate_up.weight_scale") and not self.has(p + "experts.gate_up.input_scale")):
            raise TrtcError(f"layer {i}: the ONNX MoE node runs SiLU experts in the model dtype or FP8 only; "
                            "use --backend cuda for this model")
        logits = self.cast(g.op("Gemm", [x, p + "router.weight"], transB=1), TensorProto.FLOAT)  # [T, E]
        probs = g.op("Softmax", [logits], axis=-1)
        weights, ids = g.op("TopK", [probs, g.const([moe.top_k])], num_outputs=2, axis=-1)  # [T, k]
        if moe.normalize_topk:
            weights = g.op("Div", [weights, g.op("ReduceSum", [weights, g.const([-1])], keepdims=1)])
        one = g.const(1.0, np.float32)
        scales = [p + f"experts.{m}.{t}" if self.has(p + f"experts.{m}.{t}") else one
                  for m in ("gate_up", "down") for t in ("weight_scale", "input_scale")]
        y = g.trtc_op("MoE", [x, weights, ids, p + "experts.gate_up.weight", *scales[:2], p + "experts.down.weight",
                              *scales[2:]])
        g.typed(y, self.act, [T, self.s.graph.hidden_size])
        if moe.shared_intermediate_size:
            s = self._rows(p + "shared.gate_up.weight") // 2
            gate, up = g.op("Split", [self.linear(x, p + "shared.gate_up"), g.const([s, s])], num_outputs=2, axis=1)
            shared = self.linear(g.op("Mul", [self.activation(gate, mlp.activation), up]), p + "shared.down", bias=False)
            if moe.shared_gate:
                shared = g.op("Mul", [g.op("Sigmoid", [g.op("Gemm", [x, p + "shared_gate.weight"], transB=1)]), shared])
            y = g.op("Add", [y, shared])
        return y

    def activation(self, x: str, kind: str) -> str:
        g = self.g
        if kind == "silu":
            return g.op("Mul", [x, g.op("Sigmoid", [x])])
        if kind == "relu":
            return g.op("Relu", [x])
        if kind == "relu2":
            r = g.op("Relu", [x])
            return g.op("Mul", [r, r])
        return g.op("Gelu", [x], approximate="tanh" if kind == "gelu_tanh" else "none")


def lower(spec: RankSpec) -> GraphBuilder:
    return Lowering(spec).run()

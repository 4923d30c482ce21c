"""The reference forward: the layer graph executed in plain PyTorch with a contiguous KV cache.

It is the oracle every kernel and the runtime are checked against. It runs the shards of one or
more tensor-parallel ranks in one process: each rank computes its partial result from its own
shard, and the partials are summed where the runtime does an all-reduce (after o and down) and
concatenated where it gathers (the vocab-parallel LM head). With one rank it is the plain model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from trtc.formats.checkpoint import CheckpointConfig, load_rank_weights, torch_dtype
from trtc.formats.graph import ModelGraph
from trtc.formats.mapping import Mapping
from trtc.formats.quant_layout import QuantConfig, dequantize_fp8, in_model_dtype, quantize_fp8
from trtc.plugins.activation.reference import ACTIVATION_FNS, gated_activation
from trtc.plugins.attention.reference import attention
from trtc.plugins.attention.rope import apply_rope, inv_freq, rope_cos_sin
from trtc.plugins.gemm import linear
from trtc.plugins.norm.reference import norm, rms_norm


@dataclass
class KVCache:
    """Per rank, per layer: k and v of shape [batch, seq, local_kv_heads, head_dim]."""

    k: list[list[torch.Tensor | None]] = field(default_factory=list)
    v: list[list[torch.Tensor | None]] = field(default_factory=list)
    length: int = 0


class ReferenceModel:
    def __init__(self, graph: ModelGraph, mapping: Mapping, rank_weights: list[dict[str, torch.Tensor]]) -> None:
        assert len(rank_weights) == mapping.tp_size
        self.graph, self.mapping, self.ranks = graph, mapping, rank_weights
        self.dtype = rank_weights[0]["embedding.weight"].dtype
        self.device = rank_weights[0]["embedding.weight"].device

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, device: str | torch.device = "cpu", dtype: str | None = None
    ) -> ReferenceModel:
        config = CheckpointConfig.load(Path(directory))
        ranks = [load_rank_weights(Path(directory), r, device) for r in range(config.mapping.tp_size)]
        if dtype is not None:  # the model dtype; quantized tensors and scales keep theirs
            quant = QuantConfig.from_dict(config.quantization)
            ranks = [{k: t.to(torch_dtype(dtype)) if in_model_dtype(k, quant) else t for k, t in w.items()} for w in ranks]
        return cls(config.graph, config.mapping, ranks)

    def new_cache(self) -> KVCache:
        n = self.graph.num_layers
        return KVCache(k=[[None] * n for _ in self.ranks], v=[[None] * n for _ in self.ranks])

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """input_ids: [B, T] appended after the cache's `length` tokens -> logits [B, T, vocab] float32."""
        b, t = input_ids.shape
        positions = torch.arange(cache.length, cache.length + t, device=self.device)
        h = self._all_reduce([self._embed(r, input_ids) for r in range(len(self.ranks))])  # [B, T, hidden]
        if self.graph.embedding_scale is not None:
            h = h * torch.tensor(self.graph.embedding_scale, dtype=h.dtype)
        w0 = self.ranks[0]  # replicated tensors (norms, row-parallel biases) are read from rank 0
        for i, layer in enumerate(self.graph.layers):
            p = f"layers.{i}."
            x = self._norm(h, layer.input_norm, p + "input_norm")
            a = self._all_reduce([self._attention(r, i, x, positions, cache) for r in range(len(self.ranks))])
            if layer.attention.o_bias:
                a = a + w0[p + "attention.o.bias"]
            h = h + self._norm(a, layer.attention_output_norm, p + "attention_output_norm")
            x = self._norm(h, layer.post_attention_norm, p + "post_attention_norm")
            m = self._all_reduce([self._mlp(w, i, x) for w in self.ranks])
            if layer.mlp.bias:
                m = m + w0[p + "mlp.down.bias"]
            h = h + self._norm(m, layer.mlp_output_norm, p + "mlp_output_norm")
        cache.length += t
        h = norm(h, self.graph.final_norm, w0["final_norm.weight"], w0.get("final_norm.bias"))
        head = "embedding.weight" if self.graph.tie_word_embeddings else "lm_head.weight"
        logits = torch.cat([F.linear(h, w[head]) for w in self.ranks], dim=-1)  # the vocab-parallel gather
        cap = self.graph.final_logit_soft_cap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits[..., : self.graph.vocab_size].float()

    def _norm(self, x: torch.Tensor, cfg, name: str) -> torch.Tensor:
        """cfg None: the identity."""
        w0 = self.ranks[0]
        return x if cfg is None else norm(x, cfg, w0[name + ".weight"], w0.get(name + ".bias"))

    @staticmethod
    def _all_reduce(partials: list[torch.Tensor]) -> torch.Tensor:
        out = partials[0]
        for p in partials[1:]:
            out = out + p
        return out

    def _embed(self, rank: int, ids: torch.Tensor) -> torch.Tensor:
        table = self.ranks[rank]["embedding.weight"]  # [local_vocab, hidden], rows [rank * local_vocab, ...)
        start = rank * table.shape[0]
        local = ids - start
        inside = (local >= 0) & (local < table.shape[0])
        return F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside[..., None].to(table.dtype)

    def _attention(self, rank: int, i: int, x: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        w, a, p = self.ranks[rank], self.graph.layers[i].attention, f"layers.{i}.attention."
        b, t, _ = x.shape
        hq, hkv, d = self.mapping.local_heads(a), self.mapping.local_kv_heads(a), a.head_dim
        q = linear(x, w, p + "q").view(b, t, hq, d)
        k = linear(x, w, p + "k").view(b, t, hkv, d)
        v = linear(x, w, p + "v").view(b, t, hkv, d)
        if a.qk_norm:
            q = rms_norm(q, w[p + "q_norm.weight"], a.qk_norm_eps, a.qk_norm_offset)
            k = rms_norm(k, w[p + "k_norm.weight"], a.qk_norm_eps, a.qk_norm_offset)
        if a.use_rope:
            freq = inv_freq(a.rope, a.rope_dim, int(positions[-1]) + 1, self.graph.max_position_embeddings)
            cos, sin = rope_cos_sin(freq, positions, x.dtype, a.rope.attention_factor)
            q = torch.stack([apply_rope(q[s], cos, sin) for s in range(b)])
            k = torch.stack([apply_rope(k[s], cos, sin) for s in range(b)])
        if p + "k_cache_scale" in w:  # FP8 KV cache: attention reads back what the pool stores
            k = dequantize_fp8(quantize_fp8(k, w[p + "k_cache_scale"]), w[p + "k_cache_scale"], k.dtype)
            v = dequantize_fp8(quantize_fp8(v, w[p + "v_cache_scale"]), w[p + "v_cache_scale"], v.dtype)
        if cache.k[rank][i] is not None:
            k, v = torch.cat([cache.k[rank][i], k], 1), torch.cat([cache.v[rank][i], v], 1)
        cache.k[rank][i], cache.v[rank][i] = k, v
        out = torch.stack(
            [attention(q[s], k[s], v[s], positions, a.softmax_scale, a.sliding_window, a.soft_cap) for s in range(b)]
        )
        return linear(out.reshape(b, t, hq * d), w, p + "o", bias=False)

    def _mlp(self, w: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
        m, p = self.graph.layers[i].mlp, f"layers.{i}.mlp."
        if m.moe is not None:
            return self._moe(w, i, x)
        up = linear(x, w, p + "up")
        if m.gated:
            y = gated_activation(linear(x, w, p + "gate"), up, m.activation)
        else:
            y = ACTIVATION_FNS[m.activation](up)
        return linear(y, w, p + "down", bias=False)

    def _moe(self, w: dict[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
        """A mixture of experts, token by token: softmax over the router's logits, the top-k
        (renormalised), each chosen expert's gated MLP from the checkpoint's stacks (this rank's slice
        of every expert), weighted and summed; plus the shared expert."""
        m, p = self.graph.layers[i].mlp, f"layers.{i}.mlp."
        moe, lead = m.moe, x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [N, hidden]
        probs = torch.softmax(F.linear(x, w[p + "router.weight"]).float(), dim=-1)  # [N, E]
        top, ids = torch.topk(probs, moe.top_k, dim=-1)
        if moe.normalize_topk:
            top = top / top.sum(dim=-1, keepdim=True)
        stacks = {k[len(p) + 8:]: t for k, t in w.items() if k.startswith(p + "experts.")}  # "gate.weight": [E, ...]
        out = torch.zeros_like(x, dtype=torch.float32)
        for n in range(x.shape[0]):
            for j in range(moe.top_k):
                e = {k: t[int(ids[n, j])] for k, t in stacks.items()}
                y = gated_activation(linear(x[n:n + 1], e, "gate"), linear(x[n:n + 1], e, "up"), m.activation)
                out[n] += top[n, j] * linear(y, e, "down")[0].float()
        out = out.to(x.dtype)
        if moe.shared_intermediate_size:
            y = gated_activation(linear(x, w, p + "shared.gate"), linear(x, w, p + "shared.up"), m.activation)
            shared = linear(y, w, p + "shared.down", bias=False)
            if moe.shared_gate:
                shared = torch.sigmoid(F.linear(x, w[p + "shared_gate.weight"])) * shared
            out = out + shared
        return out.reshape(*lead, -1)

    @torch.no_grad()
    def generate_greedy(self, input_ids: list[int], max_new_tokens: int, end_ids: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding of one prompt; returns the generated tokens (an end id included)."""
        cache = self.new_cache()
        logits = self.forward(torch.tensor([input_ids], device=self.device), cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in end_ids:
                break
            logits = self.forward(torch.tensor([[token]], device=self.device), cache)
        return out

"""The model runner: the layer graph executed over the paged KV cache, for one rank.

On a machine without a GPU it runs the plugins' reference implementations; the GPU kernels
plug in at the same calls. Tokens of all scheduled sequences travel flattened: [T, ...].
"""

from __future__ import annotations

from dataclasses import astuple

import torch
import torch.nn.functional as F

from trtc.checkpoint import torch_dtype
from trtc.compiler.layout import local_qkv_sizes
from trtc.plugins.gemm import linear
from trtc.plugins.activation.reference import ACTIVATION_FNS, gated_activation
from trtc.plugins.attention.paged import paged_attention, write_kv
from trtc.plugins.attention.rope import apply_rope, inv_freq, rope_cos_sin
from trtc.plugins.norm.reference import norm, rms_norm
from trtc.runtime.attention_metadata import AttentionMetadata
from trtc.runtime.engine import Engine


class ModelRunner:
    def __init__(self, engine: Engine, device: torch.device, rank: int = 0) -> None:
        self.graph, self.mapping, self.device, self.rank = engine.graph, engine.mapping, device, rank
        self.build_config = engine.build_config
        self.w = engine.load_weights(rank, device)  # straight onto the device
        self.dtype = self.w["embedding.weight"].dtype
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The paged pool, per layer: k and v [num_blocks, tokens_per_block, local_kv_heads, head_dim]."""
        kv_dtype = torch_dtype(self.build_config.kv_cache_dtype)
        self.k_cache, self.v_cache = [], []
        for layer in self.graph.layers:
            a = layer.attention
            shape = (num_blocks, self.build_config.tokens_per_block, self.mapping.local_kv_heads(a), a.head_dim)
            self.k_cache.append(torch.zeros(shape, dtype=kv_dtype, device=self.device))
            self.v_cache.append(torch.zeros(shape, dtype=kv_dtype, device=self.device))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _rope(self, i: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim] of layer i at `positions`, from a table built once per RoPE kind."""
        a = self.graph.layers[i].attention
        if a.rope.type == "dynamic":  # frequencies depend on the sequence length
            freq = inv_freq(a.rope, a.head_dim, int(positions.max()) + 1, self.graph.max_position_embeddings)
            return rope_cos_sin(freq, positions, self.dtype)
        key = (*astuple(a.rope), a.head_dim)
        if key not in self._rope_tables:
            all_pos = torch.arange(self.build_config.max_seq_len, device=self.device)
            self._rope_tables[key] = rope_cos_sin(inv_freq(a.rope, a.head_dim), all_pos, self.dtype)
        cos, sin = self._rope_tables[key]
        return cos[positions], sin[positions]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x  # one rank: the partial result is the result

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids: [T]; logits_indices: [S] token indices whose next-token logits are wanted.
        Returns logits [S, vocab] float32."""
        w = self.w
        h = self._embed(input_ids)  # [T, hidden]
        for i, layer in enumerate(self.graph.layers):
            p = f"layers.{i}."
            x = norm(h, layer.input_norm, w[p + "input_norm.weight"], w.get(p + "input_norm.bias"))
            h = h + self.all_reduce(self._attention(i, x, meta))
            if layer.attention.o_bias:
                h = h + w[p + "attention.o.bias"]
            x = norm(h, layer.post_attention_norm, w[p + "post_attention_norm.weight"], w.get(p + "post_attention_norm.bias"))
            h = h + self.all_reduce(self._mlp(i, x))
            if layer.mlp.bias:
                h = h + w[p + "mlp.down.bias"]
        h = h[logits_indices]
        h = norm(h, self.graph.final_norm, w["final_norm.weight"], w.get("final_norm.bias"))
        head = w["embedding.weight"] if self.graph.tie_word_embeddings else w["lm_head.weight"]
        return F.linear(h, head)[:, : self.graph.vocab_size].float()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embedding.weight"]  # [local_vocab, hidden]
        local = ids.long() - self.rank * table.shape[0]
        inside = (local >= 0) & (local < table.shape[0])
        h = F.embedding(local.clamp(0, table.shape[0] - 1), table) * inside[:, None].to(table.dtype)
        return self.all_reduce(h)

    def _attention(self, i: int, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        w, a, p = self.w, self.graph.layers[i].attention, f"layers.{i}.attention."
        t = x.shape[0]
        nq, nk, nv = local_qkv_sizes(self.graph, self.mapping, i)
        qkv = linear(x, w, p + "qkv")  # [T, nq + nk + nv]
        q, k, v = qkv.split([nq, nk, nv], dim=-1)
        q = q.reshape(t, -1, a.head_dim)  # [T, Hq, D]
        k = k.reshape(t, -1, a.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, -1, a.head_dim)
        if a.qk_norm:
            q = rms_norm(q, w[p + "q_norm.weight"], a.qk_norm_eps)
            k = rms_norm(k, w[p + "k_norm.weight"], a.qk_norm_eps)
        cos, sin = self._rope(i, meta.positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(self.k_cache[i], self.v_cache[i], k, v, meta.slot_mapping)
        out = paged_attention(
            q, self.k_cache[i], self.v_cache[i], meta.block_tables, meta.query_lens, meta.context_lens,
            meta.positions, a.softmax_scale, a.sliding_window, a.soft_cap,
        )
        return linear(out.reshape(t, -1), w, p + "o", bias=False)

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m, w, p = self.graph.layers[i].mlp, self.w, f"layers.{i}.mlp."
        if m.gated:
            gate, up = linear(x, w, p + "gate_up").chunk(2, dim=-1)
            y = gated_activation(gate, up, m.activation)
        else:
            y = ACTIVATION_FNS[m.activation](linear(x, w, p + "up"))
        return linear(y, w, p + "down", bias=False)

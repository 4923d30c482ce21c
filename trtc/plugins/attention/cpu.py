"""Paged attention on the CPU: a step's decodes in one batched call, each prefill chunk in one call,
both through torch's fused scaled-dot-product attention (grouped-query heads without copies).

The per-sequence reference (paged.py) stays the oracle of every kernel; this path computes the same
attention (causal over each sequence's cached keys, sliding window) with a few large ops instead of
several small ones per sequence, which is what bounds a CPU step. Soft-capped attention keeps the
reference (torch's fused attention has no soft-cap).

What a CPU step must not do is copy every sequence's whole context out of the pool's blocks for
each layer: a whole-prompt prefill attends over the chunk's own keys and values (as written to the
pool), and the decodes attend over `DecodeKV`, their keys and values kept contiguous from one step
to the next, to which each step appends one token per sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trtc.formats.quant_layout import dequantize_fp8


def _read(kv: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Pool values as attention reads them (dequantized from FP8, or cast to the activations' dtype)."""
    return dequantize_fp8(kv, scale, dtype) if scale is not None else kv.to(dtype)


def _gather(cache: torch.Tensor, tables: torch.Tensor, length: int, scale: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    """The first `length` cached tokens of each sequence: [B, Hkv, length, D] from cache
    [num_blocks, tokens_per_block, Hkv, D] through tables [B, W] (-1 padded)."""
    blocks = tables[:, : -(-length // cache.shape[1])].long().clamp_min(0)  # padding reads block 0, masked after
    kv = cache[blocks].flatten(1, 2)[:, :length]  # [B, length, Hkv, D]
    return _read(kv, scale, dtype).transpose(1, 2)


def _allowed(q_pos: torch.Tensor, length: int, sliding_window: int | None) -> torch.Tensor:
    """[..., length] bool: key j is visible from a query at q_pos[...] (causal, within the window)."""
    k_pos = torch.arange(length, device=q_pos.device)
    allowed = k_pos <= q_pos[..., None]
    if sliding_window is not None:
        allowed &= q_pos[..., None] - k_pos < sliding_window
    return allowed


class DecodeKV:
    """The decode rows' keys and values, per layer [B, Hkv, capacity, D] (the activations' dtype),
    carried from one step to the next while the decode batch stays the same sequences, each one token
    longer: a step then writes one new token per sequence instead of gathering every context from
    the pool again. Any other step rebuilds them from the pool, which stays the truth (the values are
    the pool's, read back exactly as a gather reads them). One per model runner; `begin_step` with
    each forward's metadata, before its layers. Kept while all layers' copies fit in max_bytes."""

    def __init__(self, num_layers: int, max_bytes: int = 1 << 30) -> None:
        self.max_bytes, self.num_layers = max_bytes, num_layers
        self.reset()

    def reset(self) -> None:
        """Forget every copy (a new pool, or the runner released)."""
        self.k: list[torch.Tensor | None] = [None] * self.num_layers
        self.v: list[torch.Tensor | None] = [None] * self.num_layers
        self._seqs: list[int] = []
        self._lens: list[int] = []
        self.continues = False

    def begin_step(self, meta) -> None:
        """This step continues the last one when its decodes are the same sequences (by first block)
        in the same order, each one token longer."""
        nd = meta.num_decodes
        seqs, lens = meta.block_tables[:nd, 0].tolist(), list(meta.context_lens[:nd])
        self.continues = nd > 0 and seqs == self._seqs and all(n == p + 1 for n, p in zip(lens, self._lens))
        self._seqs, self._lens = seqs, lens

    def read(self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, length: int,
             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, dtype: torch.dtype,
             new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The decodes' keys and values [nd, Hkv, length, D] of this layer (the step's own already in the
        pool; new_k, new_v [nd, Hkv, D]: them as the pool holds them, None: read back from it)."""
        nd = meta.num_decodes
        k, v = self.k[layer], self.v[layer]
        if self.continues and k is not None and k.shape[0] == nd and k.dtype == dtype:
            if length > k.shape[2]:  # grow by half again
                k, v = self._grow(k, length), self._grow(v, length)
            if new_k is None:  # read the step's tokens back from the pool: [nd, Hkv, D]
                slots = meta.slot_mapping[:nd].long()
                new_k = _read(k_cache.view(-1, *k_cache.shape[2:])[slots], k_scale, dtype)
                new_v = _read(v_cache.view(-1, *v_cache.shape[2:])[slots], v_scale, dtype)
            heads, capacity = k.shape[1], k.shape[2]  # row (b, h, p) of k.view(-1, D): (b * heads + h) * capacity + p
            rows = (torch.arange(nd * heads).view(nd, heads) * capacity + meta.positions[:nd, None]).flatten()
            k.view(-1, k.shape[3]).index_copy_(0, rows, new_k.reshape(-1, k.shape[3]))
            v.view(-1, v.shape[3]).index_copy_(0, rows, new_v.reshape(-1, v.shape[3]))
        else:
            k = _gather(k_cache, meta.block_tables[:nd], length, k_scale, dtype)  # [nd, Hkv, S, D]
            v = _gather(v_cache, meta.block_tables[:nd], length, v_scale, dtype)
            if 2 * self.num_layers * k.numel() * k.element_size() * 3 // 2 > self.max_bytes:
                self.k[layer] = self.v[layer] = None  # too large to keep: gathered each step
                return k, v
            k, v = self._grow(k, length), self._grow(v, length)
        self.k[layer], self.v[layer] = k, v
        return k[:, :, :length], v[:, :, :length]

    @staticmethod
    def _grow(kv: torch.Tensor, length: int) -> torch.Tensor:
        # kv: [B, Hkv, S, D] -> a copy with room for half as many tokens again past `length`, the room
        # zeroed: masked keys still meet the softmax's zero weights, and 0 * NaN of stale memory is NaN
        out = kv.new_empty(kv.shape[0], kv.shape[1], length + max(length // 2, 32), kv.shape[3])
        out[:, :, : kv.shape[2]] = kv
        out[:, :, kv.shape[2] :] = 0
        return out


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta, scale: float,
    sliding_window: int | None = None, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
    k: torch.Tensor | None = None, v: torch.Tensor | None = None, decode_kv: DecodeKV | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """q: [T, Hq, D] of a mixed batch described by meta (an AttentionMetadata: decodes first, then
    prefill chunks over a cached prefix, their K/V already in the pool). k, v: [T, Hkv, D], the
    step's new keys and values as written to the pool (None: read back from it); decode_kv: the
    runner's decode copies, `layer` this layer's. Returns [T, Hq, D]."""
    out = torch.empty_like(q)
    nd, context_lens = meta.num_decodes, meta.context_lens
    own = k is not None and k_scale is None  # the chunk's own keys, rounded to the pool's dtype as stored
    if own and k_cache.dtype != q.dtype:
        k, v = k.to(k_cache.dtype).to(q.dtype), v.to(v_cache.dtype).to(q.dtype)
    if nd:
        length = max(context_lens[:nd])
        if decode_kv is not None:
            kd, vd = decode_kv.read(layer, k_cache, v_cache, meta, length, k_scale, v_scale, q.dtype,
                                    *((k[:nd], v[:nd]) if own else ()))
        else:
            kd = _gather(k_cache, meta.block_tables[:nd], length, k_scale, q.dtype)  # [nd, Hkv, S, D]
            vd = _gather(v_cache, meta.block_tables[:nd], length, v_scale, q.dtype)
        if sliding_window is None and min(context_lens[:nd]) == length:  # every key visible, no padding
            visible = None
        else:
            visible = _allowed(meta.positions[:nd], length, sliding_window)[:, None, None]  # [nd, 1, 1, S]
        out[:nd] = F.scaled_dot_product_attention(
            q[:nd, :, None], kd, vd, attn_mask=visible, scale=scale, enable_gqa=True
        ).squeeze(2)  # [nd, Hq, 1, D] -> [nd, Hq, D]
    start = nd
    for b in range(nd, len(context_lens)):
        n, length = meta.query_lens[b], context_lens[b]
        qb = q[start : start + n].transpose(0, 1)[None]  # [1, Hq, n, D]
        if n == length and own:  # a whole prompt: its own keys, no read-back
            kb, vb = k[start : start + n].transpose(0, 1)[None], v[start : start + n].transpose(0, 1)[None]
        else:
            kb = _gather(k_cache, meta.block_tables[b : b + 1], length, k_scale, q.dtype)  # [1, Hkv, S, D]
            vb = _gather(v_cache, meta.block_tables[b : b + 1], length, v_scale, q.dtype)
        if n == length and sliding_window is None:  # a whole prompt: plain causal (the kernel skips the masked half)
            mask, causal = None, True
        else:  # a chunk over a cached prefix: query i sits at position length - n + i
            mask, causal = _allowed(meta.positions[start : start + n], length, sliding_window), False  # [n, S]
        out[start : start + n] = F.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )[0].transpose(0, 1)
        start += n
    return out

"""The model runner: the layer graph executed over the paged KV cache, for one rank.

With tensor parallelism each rank holds its shard (trtc/converters/tp.py): the partial outputs of
the row-parallel o and down projections and of the vocab-parallel embedding are summed over the
ranks (all-reduce), and the vocab-parallel LM head's logits are gathered, so that every rank ends
with the logits of the whole vocabulary.

Every op goes through its plugin's dispatch (`trtc.plugins.*`): Triton kernels for CUDA tensors,
the PyTorch references on a machine without a GPU. Tokens of all scheduled sequences travel
flattened: [T, ...]. The residual stream is carried beside the hidden state so that each norm
is fused with the residual add before it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trtc.compiler.memory_plan import LOGITS_CHUNK_ROWS
from trtc.formats.build_config import kv_cache_torch_dtype
from trtc.formats.engine import Engine
from trtc.formats.engine_layout import local_qkv_sizes
from trtc.formats.graph import NormConfig
from trtc.formats.quant_layout import FP8, quantize_fp8
from trtc.plugins.activation import ACTIVATION_FNS, act_and_mul
from trtc.plugins.attention import (
    decode_tactics,
    paged_attention,
    rope_and_write_kv,
)
from trtc.plugins.attention.cpu import DecodeKV
from trtc.plugins.attention.metadata import AttentionMetadata
from trtc.plugins.attention.rope import inv_freq, rope_cos_sin
from trtc.plugins.gemm import linear
from trtc.plugins.gemm.tactics import TacticTable
from trtc.plugins.moe import experts_of, kernel_takes, moe
from trtc.plugins.norm import fused_add_rms_norm, norm, rms_norm
from trtc.runtime.parallel.distributed import RankGroup


def cpu_weights(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CPU computes in float32, as CPU runtimes do: its half-precision norms, RoPE and attention are
    slower than float32 ones. bf16 weights stay bf16 where the CPU multiplies bf16 natively (AVX512-BF16,
    AMX: its bf16 GEMMs beat float32 ones; the activations are cast for each GEMM), else they are
    widened to float32 once at load, like fp16 weights."""
    native_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    keep = (torch.float32, torch.bfloat16) if native_bf16 else (torch.float32,)
    return {n: t.float() if t.is_floating_point() and t.itemsize == 2 and t.dtype not in keep else t
            for n, t in w.items()}


class ModelRunner:
    def __init__(self, engine: Engine, device: torch.device, rank: int = 0, group: RankGroup | None = None) -> None:
        """group: the tensor-parallel ranks (None: one rank)."""
        self.graph, self.mapping, self.device, self.rank = engine.graph, engine.mapping, device, rank
        self.group = group
        self.build_config = engine.build_config
        self.w = engine.load_weights(rank, device)  # straight onto the device
        self.dtype = self.w["embedding.weight"].dtype  # of the activations
        if device.type == "cpu":
            self.w, self.dtype = cpu_weights(self.w), torch.float32
        # bf16 GEMMs under float32 activations (cpu_weights) hand bf16 on from gate_up to down, as HF does
        # (the gated activation runs on gate_up's bf16 output); attention, norms, RoPE and the residual
        # stream stay float32: torch's CPU attention in bf16 made 64 bf16 requests in flight 1.7x slower
        # (one rank: tensor-parallel partial sums stay float32)
        self._bf16_between = (self.dtype == torch.float32 and self.w["embedding.weight"].dtype == torch.bfloat16
                               and self.mapping.tp_size == 1)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self._rope_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> its kind's tables
        self._long_rope_context = self.graph.long_rope_context  # None: no LongRoPE
        # the decodes' keys and values carried from step to step (CPU attention)
        self._decode_kv = DecodeKV(self.graph.num_layers) if device.type == "cpu" else None
        if device.type == "cuda":
            from trtc.plugins.gemm.triton_quant import split_k_locks
            from trtc.plugins.gemm.w4a16_packed import prepare_weights

            self._split_k_locks = split_k_locks(device)  # before any CUDA graph capture; held while this runner lives
            prepare_weights(self.w, self.dtype, device)  # INT4 layers: the CUDA kernel's layout beside the engine's
        self.gemm_tactics = TacticTable(engine.tactics.get("gemm"))  # tuned at build, this engine's own
        self.lora = None  # LoRASlots, with adapters enabled (trtc/runtime/lora.py)
        self.lora_step: list | None = None  # this step's (slot, token rows) of each adapter; None: no adapter
        self.decode_tactics = decode_tactics(engine.tactics.get("decode_attention"))
        fp8_kv = self.build_config.kv_cache_dtype == "fp8"  # per-layer (k, v) scales of an FP8 pool
        self._kv_scales = [
            (self.w[f"layers.{i}.attention.k_cache_scale"], self.w[f"layers.{i}.attention.v_cache_scale"])
            if fp8_kv else (None, None) for i in range(self.graph.num_layers)
        ]

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The paged pool, per layer: k and v [num_blocks, tokens_per_block, local_kv_heads, head_dim]."""
        kv_dtype = kv_cache_torch_dtype(self.build_config.kv_cache_dtype)
        self.k_cache, self.v_cache = [], []
        if self._decode_kv is not None:
            self._decode_kv.reset()
        for layer in self.graph.layers:
            a = layer.attention
            shape = (num_blocks, self.build_config.tokens_per_block, self.mapping.local_kv_heads(a), a.head_dim)
            self.k_cache.append(torch.zeros(shape, dtype=kv_dtype, device=self.device))
            self.v_cache.append(torch.zeros(shape, dtype=kv_dtype, device=self.device))

    def largest_step(self) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The forward's arguments for the worst step the scheduler admits: max_num_tokens prompt tokens
        (sequences of up to max_seq_len) and the logits of max_batch_size rows, over a scratch pool it
        allocates (trtc/runtime/profile_run.py runs it)."""
        bc = self.build_config
        tokens, tpb = bc.max_num_tokens, bc.tokens_per_block
        seq = min(tokens, bc.max_seq_len)
        lens = [seq] * (tokens // seq) + ([tokens % seq] if tokens % seq else [])
        per_seq = -(-seq // tpb)
        self.allocate_kv_cache(len(lens) * per_seq)
        dev = self.device
        tables = torch.arange(len(lens) * per_seq, dtype=torch.int32, device=dev).view(len(lens), per_seq)
        positions = torch.cat([torch.arange(n, device=dev) for n in lens])  # [T]
        seq_of = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))  # [T]
        slots = tables[seq_of, positions // tpb].long() * tpb + positions % tpb  # [T]
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, block_tables=tables, query_lens=lens,
                                 context_lens=lens)
        input_ids = torch.zeros(tokens, dtype=torch.long, device=dev)
        return input_ids, meta, torch.arange(min(tokens, bc.max_batch_size), device=dev)

    def release(self) -> None:
        """Free the weights, the KV-cache pool, the RoPE tables and the workspaces now; the runner is
        unusable after."""
        self.k_cache, self.v_cache, self.w = [], [], {}
        self._rope_tables, self._layer_rope, self._kv_scales = {}, {}, []
        self._split_k_locks = None
        if self._decode_kv is not None:
            self._decode_kv.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.w.values())

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def _rope(self, i: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin tables [n, head_dim] of layer i, read at `positions` by the kernels; built once
        per RoPE kind for every position up to max_seq_len. LongRoPE: the short factors' rows, then
        the long factors' (read at long_rope_rows' rows)."""
        a = self.graph.layers[i].attention
        if a.rope.per_step and a.rope.long_context is None:  # dynamic NTK: a table for this step
            n = int(positions.max()) + 1
            freq = inv_freq(a.rope, a.rope_dim, n, self.graph.max_position_embeddings)
            return rope_cos_sin(freq, torch.arange(n, device=self.device), self.dtype, a.rope.attention_factor)
        if i not in self._layer_rope:  # layers of one RoPE kind share their tables
            key = (repr(a.rope), a.rope_dim)  # LongRoPE's factors are lists
            if key not in self._rope_tables:
                all_pos = torch.arange(self.build_config.max_seq_len, device=self.device)
                if a.rope.long_context is None:
                    self._rope_tables[key] = rope_cos_sin(inv_freq(a.rope, a.rope_dim), all_pos, self.dtype)
                else:
                    short, long = (rope_cos_sin(inv_freq(a.rope, a.rope_dim, n), all_pos, self.dtype,
                                                a.rope.attention_factor) for n in (0, a.rope.long_context + 1))
                    self._rope_tables[key] = torch.cat([short[0], long[0]]), torch.cat([short[1], long[1]])
            self._layer_rope[i] = self._rope_tables[key]
        return self._layer_rope[i]

    def long_rope_rows(self, meta: AttentionMetadata) -> torch.Tensor | None:
        """[T] each token's row in the LongRoPE tables: its position, past max_seq_len (the long
        factors' rows) when its sequence's whole length is past the original context, so that each
        sequence gets its own factors whatever it is batched with. None: no LongRoPE."""
        context = self._long_rope_context
        if context is None:
            return None
        seq_lens = np.asarray(meta.seq_lens if meta.seq_lens is not None else meta.context_lens)
        offsets = np.repeat((seq_lens > context) * self.build_config.max_seq_len, meta.query_lens)
        return meta.positions + torch.from_numpy(offsets).to(meta.positions)

    def graph_capturable(self) -> bool:
        """Decode can be captured as a CUDA graph: kernels without host syncs (the Triton ones and
        cuBLAS, which run for bf16/fp16 models on a GPU, quantized or not, over a pool in the model
        dtype or FP8), RoPE tables that do not change with the sequence length, and experts that the
        fused MoE kernel takes."""
        dynamic = any(layer.attention.rope.per_step for layer in self.graph.layers)
        kv_dtype = kv_cache_torch_dtype(self.build_config.kv_cache_dtype)
        moe_loop = any(not kernel_takes(experts_of(self.w, f"layers.{i}.mlp.experts"), layer.mlp.activation)
                       for i, layer in enumerate(self.graph.layers) if layer.mlp.moe is not None)  # e.g. INT4 experts
        return self.dtype in (torch.bfloat16, torch.float16) and kv_dtype in (self.dtype, FP8) and not dynamic and not moe_loop

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.group is None else self.group.all_reduce(x)  # one rank: the partial result is the result

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, logits_indices: torch.Tensor,
                on_logits: Callable[[int, torch.Tensor], None] | None = None,
                logits_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """input_ids: [T]; logits_indices: [S] token indices whose next-token logits are wanted.
        Returns logits [S, vocab] float32 (written into logits_out [>= S, vocab] f32 when given). With
        `on_logits`, the rows are computed max_batch_size at a time (the float32 rows the memory plan
        counts; every rank chunks alike), each chunk [c, vocab] goes to on_logits(first row, chunk) as
        it is computed, and None is returned."""
        w = self.w
        if self._decode_kv is not None:
            self._decode_kv.begin_step(meta)
        h, residual = self._embed(input_ids), None  # h: [T, hidden]
        rope_rows = self.long_rope_rows(meta)  # None: the tables are read at meta.positions
        if self.graph.embedding_scale is not None:
            h = h * torch.tensor(self.graph.embedding_scale, dtype=h.dtype)
        for i, layer in enumerate(self.graph.layers):
            p = f"layers.{i}."
            x, residual = self._add_norm(h, residual, layer.input_norm, p + "input_norm", p + "attention.qkv")
            h = self.all_reduce(self._attention(i, x, meta, rope_rows))
            if layer.attention.o_bias:
                h = h + w[p + "attention.o.bias"]
            if layer.attention_output_norm is not None:
                h = norm(h, layer.attention_output_norm, w[p + "attention_output_norm.weight"])
            x, residual = self._add_norm(h, residual, layer.post_attention_norm, p + "post_attention_norm",
                                         p + ("mlp.gate_up" if layer.mlp.gated else "mlp.up"))
            h = self.all_reduce(self._mlp(i, x))
            if layer.mlp.bias:
                h = h + w[p + "mlp.down.bias"]
            if layer.mlp_output_norm is not None:
                h = norm(h, layer.mlp_output_norm, w[p + "mlp_output_norm.weight"])
        h, _ = self._add_norm(h[logits_indices], residual[logits_indices], self.graph.final_norm, "final_norm")
        rows = self.build_config.max_batch_size  # the same chunks on every rank: the LM head's gathers match
        if on_logits is None:
            out = logits_out if logits_out is not None else torch.empty(
                h.shape[0], self.graph.vocab_size, dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], rows):
                self.compute_logits(h[start : start + rows], out[start:])
            return out[: h.shape[0]]
        for start in range(0, h.shape[0], rows):
            on_logits(start, self.compute_logits(h[start : start + rows], logits_out))
        return None

    def compute_logits(self, h: torch.Tensor, out: torch.Tensor | None = None,
                       chunk_rows: int = LOGITS_CHUNK_ROWS) -> torch.Tensor:
        """h: [S, hidden] final-normed rows -> logits [S, vocab] float32, into `out` ([>= S, vocab] f32;
        allocated when None). The LM head runs chunk_rows rows at a time, so that its model-dtype output
        (and under tensor parallelism the gathered copy) is never more than one chunk: the memory plan
        counts the float32 rows and one chunk."""
        head = self.w["embedding.weight"] if self.graph.tie_word_embeddings else self.w["lm_head.weight"]
        vocab, rows = self.graph.vocab_size, h.shape[0]
        out = torch.empty(rows, vocab, dtype=torch.float32, device=h.device) if out is None else out[:rows]
        for start in range(0, rows, chunk_rows):
            part = F.linear(h[start : start + chunk_rows].to(head.dtype), head)  # [C, local_vocab]
            if self.graph.final_logit_soft_cap is not None:
                cap = self.graph.final_logit_soft_cap
                part = cap * torch.tanh(part / cap)
            if self.group is not None:
                part = self.group.all_gather_vocab(part)  # [C, padded_vocab]
            out[start : start + part.shape[0]].copy_(part[:, :vocab])
        return out

    def _add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, cfg: NormConfig | None, name: str,
        next_linear: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None means x is the first input; cfg None: no
        norm. When the linear layer that reads the norm is FP8, the norm's output is quantized for it
        in the same kernel."""
        if cfg is None:
            h = x if residual is None else x + residual
            scale = self.w.get(f"{next_linear}.input_scale") if next_linear else None
            return (h if scale is None else quantize_fp8(h, scale)), h
        weight = self.w[name + ".weight"]
        if cfg.kind == "rms" and not cfg.bias:
            out_scale = self.w.get(f"{next_linear}.input_scale") if next_linear else None
            return fused_add_rms_norm(x, residual, weight, cfg.eps, cfg.offset, out_scale)
        h = x if residual is None else x + residual
        return norm(h, cfg, weight, self.w.get(name + ".bias")), h

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embedding.weight"]  # [local_vocab, hidden]
        if self.mapping.tp_size == 1:
            return F.embedding(ids, table).to(self.dtype)
        local = ids.long() - self.rank * table.shape[0]
        inside = (local >= 0) & (local < table.shape[0])
        h = F.embedding(local.clamp(0, table.shape[0] - 1), table).to(self.dtype) * inside[:, None].to(self.dtype)
        return self.all_reduce(h)

    def _attention(self, i: int, x: torch.Tensor, meta: AttentionMetadata,
                   rope_rows: torch.Tensor | None = None) -> torch.Tensor:
        w, a, p = self.w, self.graph.layers[i].attention, f"layers.{i}.attention."
        t = x.shape[0]
        nq, nk, nv = local_qkv_sizes(self.graph, self.mapping, i)
        qkv = self._linear(x, p + "qkv", out_dtype=self.dtype)  # [T, nq + nk + nv]
        q, k, v = qkv.split([nq, nk, nv], dim=-1)
        q = q.reshape(t, -1, a.head_dim)  # [T, Hq, D]
        k = k.reshape(t, -1, a.head_dim)  # [T, Hkv, D]
        v = v.reshape(t, -1, a.head_dim)
        if a.qk_norm:
            q = rms_norm(q, w[p + "q_norm.weight"], a.qk_norm_eps, a.qk_norm_offset)
            k = rms_norm(k, w[p + "k_norm.weight"], a.qk_norm_eps, a.qk_norm_offset)
        cos, sin = self._rope(i, meta.positions) if a.use_rope else (None, None)
        k_scale, v_scale = self._kv_scales[i]  # None, or the FP8 pool's scales
        rows = meta.positions if rope_rows is None else rope_rows  # [T] rows of the cos/sin tables
        q, k = rope_and_write_kv(q, k, v, cos, sin, rows, self.k_cache[i], self.v_cache[i],
                                 meta.slot_mapping, k_scale, v_scale)
        out = paged_attention(q, self.k_cache[i], self.v_cache[i], meta, a.softmax_scale, a.sliding_window, a.soft_cap,
                              k_scale=k_scale, v_scale=v_scale, tactics=self.decode_tactics, k=k, v=v,
                              decode_kv=self._decode_kv, layer=i)
        return self._linear(out.reshape(t, -1), p + "o", bias=False, out_dtype=self.dtype)

    def _linear(self, x: torch.Tensor, name: str, **kwargs) -> torch.Tensor:
        out = linear(x, self.w, name, tactics=self.gemm_tactics, **kwargs)
        if self.lora_step is not None:  # the step's LoRA adapters (trtc/runtime/lora.py)
            out = self.lora.add_deltas(name, x, out, self.lora_step)
        return out

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        m, w, p = self.graph.layers[i].mlp, self.w, f"layers.{i}.mlp."
        if m.moe is not None:
            return self._moe(i, x)
        if m.gated:
            if self._bf16_between and w[p + "gate_up.weight"].dtype == w[p + "down.weight"].dtype == torch.bfloat16:
                x = x.to(torch.bfloat16)
            gate_up = self._linear(x, p + "gate_up", out_dtype=self.dtype)  # [T, 2 * intermediate]
            y = act_and_mul(gate_up, m.activation, w.get(p + "down.input_scale"))  # quantized for an FP8 down
        else:
            y = ACTIVATION_FNS[m.activation](self._linear(x, p + "up", out_dtype=self.dtype))
        return self._linear(y, p + "down", bias=False, out_dtype=self.dtype)

    def _moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> this rank's partial [T, hidden]: the routed experts (each rank holds
        every expert's slice of the intermediate dimension) plus the shared expert, if any."""
        m, w, p = self.graph.layers[i].mlp, self.w, f"layers.{i}.mlp."
        y = moe(x, w[p + "router.weight"], experts_of(w, p + "experts"), m.moe.top_k, m.moe.normalize_topk,
                m.activation)
        if m.moe.shared_intermediate_size:
            gate_up = self._linear(x, p + "shared.gate_up", out_dtype=self.dtype)  # [T, 2 * shared]
            shared = self._linear(act_and_mul(gate_up, m.activation, w.get(p + "shared.down.input_scale")),
                                  p + "shared.down", bias=False, out_dtype=self.dtype)  # quantized for an FP8 down
            if m.moe.shared_gate:
                shared = torch.sigmoid(self._linear(x, p + "shared_gate", bias=False)) * shared  # [T, 1] * [T, hidden]
            y = y + shared
        return y

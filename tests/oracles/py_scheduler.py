"""Pure-Python twin of the C++ runtime core (``trtc._core``): same API, same semantics, same numbers.

It is kept ONLY as the test oracle (tests run both on the same random workload and compare every batch and
every update) and as the benchmark peer (``benchmarks/scheduler_step.py``). The runtime uses the C++ core
through :mod:`trtc.runtime.scheduler`; do not import this module from runtime code.

Keep it line-for-line with ``cpp/block_manager.cpp`` and ``cpp/scheduler.cpp``: a change to one is a
change to the other.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

_M64 = (1 << 64) - 1


class BlockManager:
    """Twin of ``trtc._core.BlockManager``: paged KV-cache pool with prefix reuse (see block_manager.h)."""

    def __init__(self, num_blocks: int, tokens_per_block: int, enable_prefix_reuse: bool = True, hash_bits: int = 64):
        if num_blocks < 1:
            raise ValueError(f"num_blocks is {num_blocks}; it must be >= 1")
        if tokens_per_block < 1:
            raise ValueError(f"tokens_per_block is {tokens_per_block}; it must be >= 1")
        if not 1 <= hash_bits <= 64:
            raise ValueError(f"hash_bits is {hash_bits}; it must be in [1, 64]")
        self.num_blocks, self.tokens_per_block = num_blocks, tokens_per_block
        self._reuse, self._mask = enable_prefix_reuse, (1 << hash_bits) - 1
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks  # set while the block is registered
        # Per block, valid while it is hashed: its tokens, a unique registration stamp, and the previous block
        # of the registering sequence (-1 for a first block) with that block's stamp at the time.
        self._block_tokens: list[list[int] | None] = [None] * num_blocks
        self._stamp, self._parent, self._parent_stamp = [0] * num_blocks, [-1] * num_blocks, [0] * num_blocks
        self._next_stamp = 1
        self._free: deque[int] = deque(range(num_blocks))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks, least recently freed first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[int, tuple[list[int], list[int]]] = {}  # seq_id -> (block table, chain hashes)

    def hash_block(self, parent_hash: int, tokens) -> int:
        h = parent_hash ^ 0xCBF29CE484222325
        for t in tokens:
            h = ((h ^ (t & 0xFFFFFFFF)) * 0x100000001B3) & _M64
        h ^= h >> 33
        h = (h * 0xFF51AFD7ED558CCD) & _M64
        h ^= h >> 33
        return h & self._mask

    def _holds(self, b: int, parent: int, tokens: list[int]) -> bool:
        """True when cached block b holds the K/V of `tokens` following block `parent` (-1: first block)."""
        parent_stamp = 0 if parent < 0 else self._stamp[parent]
        return self._parent[b] == parent and self._parent_stamp[b] == parent_stamp and self._block_tokens[b] == tokens

    def _allocate_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently freed cached block
            b, _ = self._lru.popitem(last=False)
            del self._hash_to_block[self._hash[b]]
            self._hash[b] = self._block_tokens[b] = None
        self._ref[b] = 1
        return b

    def admit(self, seq_id: int, tokens: list[int], reuse_prefix: bool = True) -> int:
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} already holds blocks")
        tpb, n = self.tokens_per_block, len(tokens)
        matched, hashes, num_reclaimed, parent = [], [], 0, 0
        if self._reuse and reuse_prefix:
            for i in range((n - 1) // tpb):
                chunk = tokens[i * tpb : (i + 1) * tpb]
                h = self.hash_block(parent, chunk)
                b = self._hash_to_block.get(h)
                if b is None or not self._holds(b, matched[-1] if i else -1, chunk):
                    break
                matched.append(b)
                hashes.append(h)
                num_reclaimed += self._ref[b] == 0
                parent = h
        num_new = -(-n // tpb) - len(matched)
        if num_new > len(self._free) + len(self._lru) - num_reclaimed:
            return -1
        for b in matched:
            if self._ref[b] == 0:
                del self._lru[b]
            self._ref[b] += 1
        table = matched + [self._allocate_block() for _ in range(num_new)]
        self._seqs[seq_id] = (table, hashes)
        return len(matched) * tpb

    def append_slots(self, seq_id: int, num_tokens: int) -> bool:
        table = self._seqs[seq_id][0]
        num_new = -(-num_tokens // self.tokens_per_block) - len(table)
        if num_new > len(self._free) + len(self._lru):
            return False
        table.extend(self._allocate_block() for _ in range(num_new))
        return True

    def cache_full_blocks(self, seq_id: int, tokens: list[int], num_computed: int) -> None:
        if not self._reuse:
            return
        table, hashes = self._seqs[seq_id]
        tpb = self.tokens_per_block
        for i in range(len(hashes), num_computed // tpb):
            chunk = tokens[i * tpb : (i + 1) * tpb]
            h = self.hash_block(hashes[-1] if i else 0, chunk)
            hashes.append(h)
            b, parent = table[i], table[i - 1] if i else -1
            # Skip when the hash is taken (same tokens computed twice, or a collision: keep the first), or when
            # the parent block is not registered (then this block could never be matched).
            if h in self._hash_to_block or (parent >= 0 and self._hash[parent] is None):
                continue
            self._hash_to_block[h], self._hash[b], self._block_tokens[b] = b, h, chunk
            self._stamp[b], self._parent[b] = self._next_stamp, parent
            self._parent_stamp[b] = 0 if parent < 0 else self._stamp[parent]
            self._next_stamp += 1

    def release(self, seq_id: int) -> None:
        entry = self._seqs.pop(seq_id, None)
        for b in reversed(entry[0] if entry else []):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if self._hash[b] is not None:
                    self._lru[b] = None
                else:
                    self._free.append(b)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._seqs

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._seqs[seq_id][0])

    def _table(self, seq_id: int) -> list[int]:  # no copy, for the scheduler
        return self._seqs[seq_id][0]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_hashed(self, block_id: int) -> bool:
        return self._hash[block_id] is not None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._lru)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._lru)


@dataclass(eq=False)
class ScheduledBatch:
    """Twin of ``trtc._core.ScheduledBatch``; fields are documented in :mod:`trtc.runtime.scheduler`."""

    request_ids: np.ndarray
    query_lens: np.ndarray
    context_lens: np.ndarray
    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    block_tables: np.ndarray
    sample: np.ndarray
    num_prefill_tokens: int
    num_decode_tokens: int
    preempted: list[int]

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(eq=False)
class _Request:
    id: int
    tokens: list[int]  # prompt + generated
    num_prompt_tokens: int
    max_new_tokens: int
    end_id: int
    stop_words: list[list[int]]
    reuse_prefix: bool = True
    num_computed: int = 0
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None


@dataclass
class _BatchBuilder:
    request_ids: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)


class Scheduler:
    """Twin of ``trtc._core.Scheduler``; semantics are documented in :mod:`trtc.runtime.scheduler`."""

    def __init__(self, num_blocks: int, tokens_per_block: int, max_batch_size: int, max_num_tokens: int,
                 max_seq_len: int, enable_prefix_reuse: bool = True, *, hash_bits: int = 64):
        self._blocks = BlockManager(num_blocks, tokens_per_block, enable_prefix_reuse, hash_bits)
        for name, value in [("max_batch_size", max_batch_size), ("max_num_tokens", max_num_tokens),
                            ("max_seq_len", max_seq_len)]:
            if value < 1:
                raise ValueError(f"{name} is {value}; it must be >= 1")
        self._tpb, self._max_batch_size = tokens_per_block, max_batch_size
        self._max_num_tokens, self._max_seq_len = max_num_tokens, max_seq_len
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._cancelled: list[int] = []
        self._in_flight: list[tuple[int, int, bool]] | None = None  # (request_id, query_len, sample)
        self._reused_tokens = self._num_preemptions = 0

    def add_request(self, request_id: int, prompt: list[int], max_new_tokens: int, end_id: int = -1,
                    stop_words: list[list[int]] = (), reuse_prefix: bool = True) -> None:
        rid, n = f"request {request_id}: ", len(prompt)
        pool_tokens = self._blocks.num_blocks * self._tpb
        if n == 0:
            raise ValueError(rid + "prompt is empty; pass at least one token id")
        if request_id in self._requests:
            raise ValueError(rid + f"request_id {request_id} is already in use (not yet popped); "
                             "pop() it or use a new id")
        if max_new_tokens < 1:
            raise ValueError(rid + f"max_new_tokens is {max_new_tokens}; it must be >= 1")
        if n >= self._max_seq_len:
            raise ValueError(rid + f"prompt has {n} tokens but the engine's max_seq_len is {self._max_seq_len}; "
                             "rebuild with a larger --max_seq_len")
        if n + 1 > pool_tokens:
            raise ValueError(rid + f"prompt has {n} tokens but the KV-cache pool holds only {pool_tokens} "
                             f"({self._blocks.num_blocks} blocks of {self._tpb}); give the KV cache more memory or "
                             "shorten the prompt")
        for i, stop in enumerate(stop_words):
            if not stop:
                raise ValueError(rid + f"stop_words[{i}] is empty; drop it")
        max_new_tokens = min(max_new_tokens, self._max_seq_len - n, pool_tokens - n + 1)
        r = _Request(request_id, [int(t) for t in prompt], n, max_new_tokens, end_id, [list(s) for s in stop_words],
                     reuse_prefix)
        self._waiting.append(r)
        self._requests[request_id] = r

    def cancel(self, request_id: int) -> bool:
        r = self._requests.get(request_id)
        if r is None or r.status == "finished":
            return False
        if r.status == "waiting":
            self._waiting.remove(r)
        else:
            self._blocks.release(request_id)
            self._running.remove(r)
        r.status, r.finish_reason = "finished", "cancelled"
        self._cancelled.append(request_id)
        return True

    def _preempt_last_running(self, batch: _BatchBuilder) -> None:
        victim = self._running.pop()
        self._blocks.release(victim.id)
        victim.status, victim.num_computed = "waiting", 0
        self._waiting.appendleft(victim)
        batch.preempted.append(victim.id)
        self._num_preemptions += 1

    def _add_chunk(self, batch: _BatchBuilder, r: _Request, num_tokens: int) -> None:
        table, tpb = self._blocks._table(r.id), self._tpb
        start, end = r.num_computed, r.num_computed + num_tokens
        batch.request_ids.append(r.id)
        batch.query_lens.append(num_tokens)
        batch.context_lens.append(end)
        batch.input_ids += r.tokens[start:end]
        batch.positions += range(start, end)
        batch.slot_mapping += [table[p // tpb] * tpb + p % tpb for p in range(start, end)]
        batch.sample.append(end == len(r.tokens))
        self._in_flight.append((r.id, num_tokens, end == len(r.tokens)))

    def schedule(self) -> ScheduledBatch:
        if self._in_flight is not None:
            raise RuntimeError("schedule() called twice; call update() once after every schedule()")
        self._in_flight, batch, budget = [], _BatchBuilder(), self._max_num_tokens

        i = 0  # 1. decodes, in admission order; preempt from the back when blocks run out
        while i < len(self._running) and budget > 0:
            r = self._running[i]
            i += 1
            if len(r.tokens) - r.num_computed != 1:
                continue
            preempted_itself = False
            while not preempted_itself and not self._blocks.append_slots(r.id, r.num_computed + 1):
                preempted_itself = self._running[-1] is r
                self._preempt_last_running(batch)
            if preempted_itself:
                break
            self._add_chunk(batch, r, 1)
            budget -= 1
        num_decode_tokens = self._max_num_tokens - budget

        for r in self._running:  # 2. running chunked prefills continue
            if budget == 0:
                break
            remaining = len(r.tokens) - r.num_computed
            if remaining > 1:
                chunk = min(remaining, budget)
                self._add_chunk(batch, r, chunk)
                budget -= chunk

        # 3. waiting requests, first come first served; stop at the first that does not fit
        while self._waiting and budget > 0 and len(self._running) < self._max_batch_size:
            r = self._waiting[0]
            reused = self._blocks.admit(r.id, r.tokens, r.reuse_prefix)
            if reused < 0:
                break
            self._waiting.popleft()
            self._running.append(r)
            r.status, r.num_computed = "running", reused
            self._reused_tokens += reused
            chunk = min(len(r.tokens) - reused, budget)
            self._add_chunk(batch, r, chunk)
            budget -= chunk

        tables = [self._blocks._table(rid) for rid in batch.request_ids]
        block_tables = np.full((len(tables), max(map(len, tables), default=0)), -1, dtype=np.int32)
        for row, table in enumerate(tables):
            block_tables[row, : len(table)] = table
        return ScheduledBatch(
            request_ids=np.array(batch.request_ids, dtype=np.int64),
            query_lens=np.array(batch.query_lens, dtype=np.int32),
            context_lens=np.array(batch.context_lens, dtype=np.int32),
            input_ids=np.array(batch.input_ids, dtype=np.int32),
            positions=np.array(batch.positions, dtype=np.int32),
            slot_mapping=np.array(batch.slot_mapping, dtype=np.int32),
            block_tables=block_tables,
            sample=np.array(batch.sample, dtype=bool),
            num_prefill_tokens=self._max_num_tokens - budget - num_decode_tokens,
            num_decode_tokens=num_decode_tokens,
            preempted=batch.preempted,
        )

    @staticmethod
    def _check_finish(r: _Request, token: int) -> str | None:
        if token == r.end_id:
            return "end_id"
        generated = len(r.tokens) - r.num_prompt_tokens
        for stop in r.stop_words:
            if len(stop) <= generated and r.tokens[-len(stop) :] == stop:
                return "stop_words"
        if generated >= r.max_new_tokens:
            return "length"
        return None

    def update(self, tokens) -> list[tuple[int, int, str | None]]:
        if self._in_flight is None:
            raise RuntimeError("update() called without schedule(); call it once after every schedule()")
        tokens = [int(t) for t in tokens]
        num_sample = sum(s for _, _, s in self._in_flight)
        if len(tokens) != num_sample:
            raise ValueError(f"update() got {len(tokens)} tokens but the batch has {num_sample} requests with "
                             "sample=True; pass one token per such request, in batch order")
        in_flight, self._in_flight = self._in_flight, None
        outputs, sampled = [], iter(tokens)
        for request_id, query_len, sample in in_flight:
            token = next(sampled) if sample else -1
            r = self._requests.get(request_id)
            if r is None or r.status != "running":  # cancelled meanwhile
                continue
            r.num_computed += query_len
            self._blocks.cache_full_blocks(r.id, r.tokens, r.num_computed)
            if not sample:
                continue
            r.tokens.append(token)
            reason = self._check_finish(r, token)
            outputs.append((r.id, token, reason))
            if reason is not None:
                self._blocks.release(r.id)
                r.status, r.finish_reason = "finished", reason
        self._running = [r for r in self._running if r.status == "running"]
        outputs += [(request_id, -1, "cancelled") for request_id in self._cancelled]
        self._cancelled.clear()
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._cancelled)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def num_running(self) -> int:
        return len(self._running)

    def _find(self, request_id: int) -> _Request:
        if request_id not in self._requests:
            raise KeyError(f"unknown request_id {request_id}")
        return self._requests[request_id]

    def output_tokens(self, request_id: int) -> list[int]:
        r = self._find(request_id)
        return r.tokens[r.num_prompt_tokens :]

    def pop(self, request_id: int) -> list[int]:
        if self._find(request_id).status != "finished":
            raise ValueError(f"request {request_id} has not finished; cancel() it before pop()")
        out = self.output_tokens(request_id)
        del self._requests[request_id]
        return out

    def block_table(self, request_id: int) -> list[int]:
        return self._blocks.block_table(request_id) if self._blocks.has_sequence(request_id) else []

    def stats(self) -> dict[str, int]:
        bm = self._blocks
        return {"num_blocks": bm.num_blocks, "free_blocks": bm.num_free_blocks, "used_blocks": bm.num_used_blocks,
                "cached_blocks": bm.num_cached_blocks, "reused_tokens": self._reused_tokens,
                "num_preemptions": self._num_preemptions}

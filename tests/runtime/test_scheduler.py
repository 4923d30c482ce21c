"""In-flight-batching scheduler: worked examples, bad input, and a stateful property test that drives the C++
core and its pure-Python twin through the same random workload and checks invariants on every step."""

import gc
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from oracles import py_scheduler

from trtc import _core
from trtc.runtime.scheduler import Scheduler

IMPLS = {"cpp": _core.Scheduler, "py": py_scheduler.Scheduler}


@pytest.fixture(params=list(IMPLS))
def S(request):
    return IMPLS[request.param]


def arrays(b):
    return {k: getattr(b, k).tolist() for k in
            ("request_ids", "query_lens", "context_lens", "input_ids", "positions", "slot_mapping", "block_tables",
             "sample")}


def test_python_face_is_the_cpp_core():
    assert Scheduler is _core.Scheduler


def test_prefill_then_decode(S):
    s = S(num_blocks=16, tokens_per_block=4, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    s.add_request(1, [10, 11, 12, 13, 14, 15], max_new_tokens=8)
    s.add_request(2, [20, 21, 22], max_new_tokens=8)
    b = s.schedule()
    assert b.request_ids.dtype == np.int64 and b.sample.dtype == np.bool_
    for name in ("query_lens", "context_lens", "input_ids", "positions", "slot_mapping", "block_tables"):
        assert getattr(b, name).dtype == np.int32
    assert arrays(b) == {
        "request_ids": [1, 2], "query_lens": [6, 3], "context_lens": [6, 3],
        "input_ids": [10, 11, 12, 13, 14, 15, 20, 21, 22], "positions": [0, 1, 2, 3, 4, 5, 0, 1, 2],
        "slot_mapping": [0, 1, 2, 3, 4, 5, 8, 9, 10], "block_tables": [[0, 1], [2, -1]], "sample": [True, True]}
    assert (b.num_prefill_tokens, b.num_decode_tokens, b.preempted, len(b)) == (9, 0, [], 2)
    assert s.update([100, 200]) == [(1, 100, None), (2, 200, None)]
    b = s.schedule()
    assert arrays(b) == {
        "request_ids": [1, 2], "query_lens": [1, 1], "context_lens": [7, 4], "input_ids": [100, 200],
        "positions": [6, 3], "slot_mapping": [6, 11], "block_tables": [[0, 1], [2, -1]], "sample": [True, True]}
    assert (b.num_prefill_tokens, b.num_decode_tokens) == (0, 2)
    s.update([101, 201])
    b = s.schedule()  # request 2 crosses into a new block
    assert b.block_tables.tolist() == [[0, 1], [2, 3]] and b.slot_mapping.tolist() == [7, 12]
    s.update([102, 202])
    assert s.output_tokens(1) == [100, 101, 102] and s.output_tokens(2) == [200, 201, 202]
    # blocks cover the computed tokens; the block for a sampled token comes with its decode step
    assert s.stats() == {"num_blocks": 16, "free_blocks": 12, "used_blocks": 4, "cached_blocks": 0,
                         "reused_tokens": 0, "num_preemptions": 0}


def test_chunked_prefill_behind_decodes(S):
    s = S(num_blocks=16, tokens_per_block=4, max_batch_size=4, max_num_tokens=4, max_seq_len=64)
    s.add_request(1, [1, 2], max_new_tokens=8)
    assert s.schedule().sample.tolist() == [True]
    s.update([3])
    s.add_request(2, list(range(100, 110)), max_new_tokens=8)  # 10 tokens, budget 4 (1 goes to the decode)
    chunks = []
    for _ in range(4):
        b = s.schedule()
        chunks.append((b.request_ids.tolist(), b.query_lens.tolist(), b.positions.tolist()[-1], b.sample.tolist()))
        s.update([7] * int(b.sample.sum()))
    assert chunks == [
        ([1, 2], [1, 3], 2, [True, False]),
        ([1, 2], [1, 3], 5, [True, False]),
        ([1, 2], [1, 3], 8, [True, False]),
        ([1, 2], [1, 1], 9, [True, True]),  # the last prefill token: it samples
    ]
    b = s.schedule()
    assert b.query_lens.tolist() == [1, 1] and b.num_decode_tokens == 2


def test_batch_slots_and_fcfs(S):
    s = S(num_blocks=6, tokens_per_block=4, max_batch_size=2, max_num_tokens=100, max_seq_len=64)
    for i in range(3):
        s.add_request(i, [1] * 4, max_new_tokens=2)
    assert s.schedule().request_ids.tolist() == [0, 1]  # two slots
    s.update([5, 5])
    assert (s.num_running(), s.num_waiting()) == (2, 1)
    # FCFS without skipping: 3 needs 5 blocks (4 left), 4 would fit but must wait behind it.
    s2 = S(num_blocks=6, tokens_per_block=4, max_batch_size=8, max_num_tokens=100, max_seq_len=64)
    s2.add_request(0, [1] * 8, max_new_tokens=2)
    s2.add_request(3, [2] * 17, max_new_tokens=2)
    s2.add_request(4, [3] * 3, max_new_tokens=2)
    assert s2.schedule().request_ids.tolist() == [0]
    assert s2.update([9]) == [(0, 9, None)]
    assert s2.schedule().request_ids.tolist() == [0]
    assert s2.update([9]) == [(0, 9, "length")]
    assert s2.schedule().request_ids.tolist() == [3, 4]  # 6 blocks free now: 5 + 1


def test_preemption_and_recompute(S):
    s = S(num_blocks=4, tokens_per_block=2, max_batch_size=4, max_num_tokens=16, max_seq_len=64)
    s.add_request(1, [1, 2, 3], max_new_tokens=10, end_id=0)
    s.add_request(2, [4, 5, 6], max_new_tokens=10)
    s.schedule()
    s.update([7, 8])  # each: 4 known tokens, 2 blocks
    s.schedule()
    s.update([9, 10])  # each: 5 known tokens, 4 computed: next decode needs a third block
    b = s.schedule()
    assert b.preempted == [2] and b.request_ids.tolist() == [1]
    assert (s.num_running(), s.num_waiting(), s.stats()["num_preemptions"]) == (1, 1, 1)
    assert s.update([0]) == [(1, 0, "end_id")]
    b = s.schedule()  # 2 recomputes prompt + generated, reusing its first block (still cached); samples at the end
    assert b.request_ids.tolist() == [2] and b.input_ids.tolist() == [6, 8, 10]
    assert b.positions.tolist() == [2, 3, 4] and b.sample.tolist() == [True]
    assert s.stats()["reused_tokens"] == 2
    assert s.update([11]) == [(2, 11, None)]
    assert s.output_tokens(2) == [8, 10, 11]
    stats = s.stats()
    assert stats["free_blocks"] + stats["used_blocks"] + stats["cached_blocks"] == 4


def test_decode_preempts_itself_when_newest(S):
    s = S(num_blocks=3, tokens_per_block=2, max_batch_size=4, max_num_tokens=16, max_seq_len=64)
    s.add_request(1, [1, 2, 3], max_new_tokens=5, end_id=0)  # 2 blocks
    s.add_request(2, [4, 5], max_new_tokens=5)  # 1 block: the pool is full
    s.schedule()
    s.update([8, 6])
    b = s.schedule()  # 1 decodes at position 3 (has its block); 2, the newest, needs a block: it is the victim
    assert b.request_ids.tolist() == [1] and b.preempted == [2]
    assert s.stats()["cached_blocks"] == 1  # 2's full computed block [4, 5] stays hashed in the cache
    assert s.update([0]) == [(1, 0, "end_id")]
    b = s.schedule()
    assert b.request_ids.tolist() == [2] and b.input_ids.tolist() == [6] and b.positions.tolist() == [2]
    assert s.stats()["reused_tokens"] == 2 and s.stats()["num_preemptions"] == 1
    assert s.update([9]) == [(2, 9, None)] and s.output_tokens(2) == [6, 9]


def test_lone_request_always_fits_the_pool(S):
    """max_new_tokens is clipped so a request alone never needs more than the whole pool."""
    s = S(num_blocks=2, tokens_per_block=2, max_batch_size=4, max_num_tokens=16, max_seq_len=64)
    s.add_request(1, [1, 2], max_new_tokens=100)  # feeds at most 4 tokens: 2 prompt + 3 generated - 1
    out = [s.update([7] * int(s.schedule().sample.sum())) for _ in range(3)]
    assert out[-1] == [(1, 7, "length")] and s.output_tokens(1) == [7, 7, 7]


def test_prefix_reuse_across_requests(S):
    s = S(num_blocks=8, tokens_per_block=4, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    prompt = list(range(1, 10))
    s.add_request(1, prompt, max_new_tokens=1)
    a = s.schedule()
    assert s.update([50]) == [(1, 50, "length")]
    assert s.stats()["cached_blocks"] == 2  # two full blocks of the prompt; the partial one is free
    s.add_request(2, prompt[:8] + [77, 78], max_new_tokens=2)
    b = s.schedule()
    assert b.positions.tolist() == [8, 9] and b.input_ids.tolist() == [77, 78]
    assert b.context_lens.tolist() == [10] and b.block_tables[0, :2].tolist() == a.block_tables[0, :2].tolist()
    assert s.stats()["reused_tokens"] == 8 and s.stats()["cached_blocks"] == 0
    s.update([1])
    # running requests share too: 3 reuses 2's first two blocks while 2 runs
    s.add_request(3, prompt[:8] + [5], max_new_tokens=2)
    b = s.schedule()
    assert b.request_ids.tolist() == [2, 3]
    assert b.block_tables[0, :2].tolist() == b.block_tables[1, :2].tolist()
    assert s.stats()["reused_tokens"] == 16


def test_prefix_reuse_can_be_disabled(S):
    s = S(8, 4, 4, 64, 64, enable_prefix_reuse=False)
    s.add_request(1, list(range(9)), max_new_tokens=1)
    s.schedule()
    s.update([1])
    s.add_request(2, list(range(9)), max_new_tokens=1)
    assert s.schedule().query_lens.tolist() == [9]
    assert s.stats()["reused_tokens"] == 0 and s.stats()["cached_blocks"] == 0


def test_a_request_can_decline_the_prefix_cache(S):
    """reuse_prefix=False (a request whose prompt logits are wanted) computes its whole prompt; its
    full blocks are still cached for the requests after it."""
    s = S(8, 4, 4, 64, 64)
    s.add_request(1, list(range(9)), max_new_tokens=1)
    s.schedule()
    s.update([1])
    s.add_request(2, list(range(9)), max_new_tokens=1, reuse_prefix=False)
    b = s.schedule()
    assert b.query_lens.tolist() == [9] and b.positions.tolist()[0] == 0
    assert s.stats()["reused_tokens"] == 0
    s.update([1])
    s.add_request(3, list(range(9)), max_new_tokens=1)
    assert s.schedule().query_lens.tolist() == [1] and s.stats()["reused_tokens"] == 8


def run_one(s, rid, tokens):
    out = []
    for t in tokens:
        s.schedule()
        out = s.update([t])
        if out[-1][2] is not None:
            break
    return out[-1]


def test_finish_reasons(S):
    s = S(64, 4, 8, 256, 16)
    s.add_request(1, [1, 2], max_new_tokens=10, end_id=3)
    assert run_one(s, 1, [5, 3, 4]) == (1, 3, "end_id") and s.output_tokens(1) == [5, 3]
    s.add_request(2, [7, 8], max_new_tokens=10, stop_words=[[9, 9], [6]])
    assert run_one(s, 2, [7, 8, 9, 9, 1]) == (2, 9, "stop_words") and s.output_tokens(2) == [7, 8, 9, 9]
    s.add_request(4, [1, 2], max_new_tokens=3)
    assert run_one(s, 4, [1] * 5) == (4, 1, "length") and len(s.output_tokens(4)) == 3
    s.add_request(5, [1] * 12, max_new_tokens=100)  # clipped to max_seq_len 16: 4 new tokens
    assert run_one(s, 5, [2] * 10) == (5, 2, "length") and len(s.output_tokens(5)) == 4
    assert s.pop(5) == [2, 2, 2, 2]
    with pytest.raises(KeyError):
        s.output_tokens(5)


def test_stop_word_ignores_prompt(S):
    s = S(64, 4, 8, 256, 16)
    s.add_request(3, [9], max_new_tokens=3, stop_words=[[9, 4]])
    out = [run_one(s, 3, [4])]
    s.schedule()
    out += s.update([4])
    assert out == [(3, 4, None), (3, 4, None)]


def test_cancel(S):
    s = S(16, 4, 8, 256, 64)
    s.add_request(1, [1, 2, 3], 10)
    s.add_request(2, [4, 5, 6], 10)
    s.schedule()
    s.update([1, 1])
    s.add_request(3, [7], 10)
    assert s.cancel(3) and s.cancel(1)  # waiting, running
    assert not s.cancel(1) and not s.cancel(99)
    assert s.stats()["used_blocks"] == 1  # 1's blocks were freed at once
    b = s.schedule()
    assert b.request_ids.tolist() == [2]
    assert s.cancel(2)  # between schedule() and update(): update skips it
    assert s.has_unfinished()  # the cancellations are still to be reported
    assert s.update([4]) == [(3, -1, "cancelled"), (1, -1, "cancelled"), (2, -1, "cancelled")]
    assert not s.has_unfinished()
    s.schedule()
    assert s.update([]) == []  # reported once
    assert s.output_tokens(2) == [1] and s.pop(2) == [1]
    assert s.stats()["used_blocks"] == 0
    with pytest.raises(KeyError):
        s.pop(2)


def test_update_protocol(S):
    s = S(16, 4, 8, 256, 64)
    with pytest.raises(RuntimeError, match="after every schedule"):
        s.update([])
    s.add_request(1, [1, 2, 3], 10)
    s.schedule()
    with pytest.raises(RuntimeError, match="after every schedule"):
        s.schedule()
    with pytest.raises(ValueError, match="got 2 tokens but the batch has 1 requests with sample=True"):
        s.update([1, 2])
    assert s.update([1]) == [(1, 1, None)]
    with pytest.raises(ValueError, match="has not finished"):
        s.pop(1)


@pytest.mark.parametrize("tokens", [np.array([4], dtype=np.int64), np.array([4], dtype=np.int32),
                                    torch.tensor([4]), torch.tensor([4], dtype=torch.int32), [np.int64(4)]])
def test_update_accepts_arrays(tokens):
    s = _core.Scheduler(16, 4, 8, 256, 64)
    s.add_request(1, [1, 2, 3], 10)
    s.schedule()
    assert s.update(tokens) == [(1, 4, None)]


def test_batch_arrays_own_their_memory():
    s = _core.Scheduler(16, 4, 8, 256, 64)
    s.add_request(1, [1, 2, 3], 10)
    b = s.schedule()
    s.update([4])
    s.schedule()
    del s
    gc.collect()
    assert b.input_ids.tolist() == [1, 2, 3] and b.block_tables.tolist() == [[0]]
    empty = _core.Scheduler(4, 4, 4, 4, 8).schedule()
    assert empty.block_tables.shape == (0, 0) and empty.input_ids.shape == (0,) and len(empty) == 0


def test_process_ends_cleanly_after_finish_reasons():
    """The core holds no Python object past the interpreter's end: one that did (a static string of
    a finish reason) crashed every process at exit that had finished a request (Python >= 3.12)."""
    code = ("from trtc import _core\n"
            "s = _core.Scheduler(16, 4, 8, 256, 64)\n"
            "s.add_request(0, [1, 2, 3], 1)\n"
            "s.schedule()\n"
            "print(s.update([7]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[(0, 7, 'length')]", (result.returncode, result.stderr)


BAD_REQUESTS = [
    (dict(request_id=1, prompt=[], max_new_tokens=4), "request 1: prompt is empty"),
    (dict(request_id=0, prompt=[1], max_new_tokens=4), "request_id 0 is already in use"),
    (dict(request_id=1, prompt=[1], max_new_tokens=0), "max_new_tokens is 0; it must be >= 1"),
    (dict(request_id=1, prompt=[1] * 32, max_new_tokens=4),
     "prompt has 32 tokens but the engine's max_seq_len is 32; rebuild with a larger --max_seq_len"),
    (dict(request_id=1, prompt=[1] * 16, max_new_tokens=4),
     "prompt has 16 tokens but the KV-cache pool holds only 16 .4 blocks of 4.; give the KV cache more memory"),
    (dict(request_id=1, prompt=[1], max_new_tokens=4, stop_words=[[1], []]), r"stop_words\[1\] is empty"),
]


@pytest.mark.parametrize("kwargs, message", BAD_REQUESTS)
def test_bad_requests(S, kwargs, message):
    s = S(num_blocks=4, tokens_per_block=4, max_batch_size=4, max_num_tokens=64, max_seq_len=32)
    s.add_request(0, [1], 4)
    with pytest.raises(ValueError, match=message):
        s.add_request(**kwargs)
    assert s.num_waiting() == 1


@pytest.mark.parametrize("i", range(5))
def test_bad_constructor_arguments(S, i):
    args = [4, 4, 4, 64, 32]
    args[i] = 0
    with pytest.raises(ValueError, match="is 0; it must be >= 1"):
        S(*args)


# ---------------------------------------------------------------- property test: C++ core == Python twin


# Shared prefixes make prefix hits; repeated blocks (same tokens at other positions) meet 2-bit hash collisions.
BASE_PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [3, 3, 3, 3, 3, 3, 3, 3], [1, 2, 1, 2, 1, 2, 1, 2]]


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, steps with random sampled tokens, cancels and pops, on small pools and budgets, with
    prefix sharing and (sometimes) 2-bit block hashes that collide all the time."""

    @initialize(num_blocks=st.integers(2, 12), tpb=st.integers(1, 4), max_batch_size=st.integers(1, 6),
                max_num_tokens=st.integers(1, 32), max_seq_len=st.integers(2, 48), reuse=st.booleans(),
                hash_bits=st.sampled_from([64, 2]))
    def setup(self, num_blocks, tpb, max_batch_size, max_num_tokens, max_seq_len, reuse, hash_bits):
        args = (num_blocks, tpb, max_batch_size, max_num_tokens, max_seq_len, reuse)
        self.cpp = _core.Scheduler(*args, hash_bits=hash_bits)
        self.py = py_scheduler.Scheduler(*args, hash_bits=hash_bits)
        self.num_blocks, self.tpb, self.max_seq_len = num_blocks, tpb, max_seq_len
        self.kv = {}  # shadow KV cache: slot -> the token prefix whose last token's K/V the slot holds
        self.next_id = 0
        self.requests = {}  # alive (waiting or running) id -> (prompt, max_new_tokens, end_id, stop_words)
        self.finished = set()

    def known(self, rid):
        return self.requests[rid][0] + self.cpp.output_tokens(rid)

    @rule(base=st.sampled_from(BASE_PROMPTS),
          prefix=st.integers(0, 8), suffix=st.lists(st.integers(0, 9), max_size=12),
          max_new=st.integers(0, 24), end_id=st.sampled_from([-1, 0]),
          stop_words=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=2), max_size=2))
    def add_request(self, base, prefix, suffix, max_new, end_id, stop_words):
        rid, prompt = self.next_id, base[:prefix] + suffix
        self.next_id += 1
        errors = []
        for s in (self.cpp, self.py):
            try:
                s.add_request(rid, prompt, max_new, end_id, stop_words)
            except ValueError as e:
                errors.append(str(e))
        assert len(errors) in (0, 2) and len(set(errors)) <= 1, errors
        if not errors:
            self.requests[rid] = (prompt, max_new, end_id, stop_words)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def cancel(self, data):
        rid = data.draw(st.sampled_from(sorted(self.requests) + sorted(self.finished) + [self.next_id]))
        self.cancel_both(rid)

    def cancel_both(self, rid):
        assert self.cpp.cancel(rid) == self.py.cancel(rid) == (rid in self.requests)
        if rid in self.requests:
            del self.requests[rid]
            self.finished.add(rid)

    @precondition(lambda self: self.finished)
    @rule(data=st.data())
    def pop(self, data):
        rid = data.draw(st.sampled_from(sorted(self.finished)))
        assert self.cpp.pop(rid) == self.py.pop(rid)
        self.finished.remove(rid)

    @rule(data=st.data(), cancel_in_flight=st.booleans())
    def step(self, data, cancel_in_flight):
        tokens = data.draw(st.lists(st.integers(0, 9), min_size=64, max_size=64))
        in_flight = sorted(self.requests) if cancel_in_flight else []
        self.do_step(tokens, data.draw(st.sampled_from(in_flight)) if in_flight else None)

    @rule(data=st.data())
    def drain(self, data):
        """Runs to completion: every request ends, and then every block is free or cached."""
        self.run_to_completion(data.draw(st.lists(st.integers(0, 9), min_size=64, max_size=64)))

    def run_to_completion(self, tokens):
        for i in range(2000):
            if not self.cpp.has_unfinished():
                break
            self.do_step(tokens[i % 64:] + tokens[:i % 64])
        assert not self.cpp.has_unfinished() and not self.py.has_unfinished() and not self.requests
        stats = self.cpp.stats()
        assert stats["used_blocks"] == 0 and stats["free_blocks"] + stats["cached_blocks"] == self.num_blocks

    def do_step(self, tokens, cancel_in_flight=None):
        """schedule() + update() on both; optionally cancels a request in between."""
        known = {rid: self.known(rid) for rid in self.requests}
        b, pb = self.cpp.schedule(), self.py.schedule()
        for name, want in arrays(pb).items():
            got = getattr(b, name)
            assert got.dtype == getattr(pb, name).dtype and got.tolist() == want, name
        assert (b.num_prefill_tokens, b.num_decode_tokens, b.preempted) == \
               (pb.num_prefill_tokens, pb.num_decode_tokens, pb.preempted)
        self.check_batch(b, known)
        if cancel_in_flight is not None:
            self.cancel_both(cancel_in_flight)
        sampled = tokens[: int(b.sample.sum())]
        out = self.cpp.update(sampled)
        assert out == self.py.update(sampled)
        self.check_outputs(out, known)

    def check_batch(self, b, known):
        tpb, offset = self.tpb, 0
        tables = {rid: self.cpp.block_table(rid) for rid in self.requests}
        assert len(b) <= self.cpp.num_running()
        assert b.num_decode_tokens + b.num_prefill_tokens == len(b.input_ids) == b.query_lens.sum()
        for row, rid in enumerate(b.request_ids.tolist()):
            q, ctx = int(b.query_lens[row]), int(b.context_lens[row])
            computed = ctx - q
            assert q >= 1 and ctx <= len(known[rid])
            if row < b.num_decode_tokens:  # decodes come first: one token each, and they sample
                assert q == 1 and b.sample[row]
            assert bool(b.sample[row]) == (ctx == len(known[rid]))
            positions = b.positions[offset: offset + q].tolist()
            assert positions == list(range(computed, ctx))
            assert b.input_ids[offset: offset + q].tolist() == known[rid][computed:ctx]
            row_table = [x for x in b.block_tables[row].tolist() if x != -1]
            assert row_table == tables[rid] and -1 not in b.block_tables[row, :len(row_table)].tolist()
            for p, slot in zip(positions, b.slot_mapping[offset: offset + q].tolist()):
                block = row_table[p // tpb]
                assert slot == block * tpb + p % tpb  # the slot belongs to this request's block table ...
                assert all(block not in t for r, t in tables.items() if r != rid)  # ... and is never shared
            offset += q
        self.check_kv(b, known)
        holders = {}
        for rid, table in tables.items():
            assert len(set(table)) == len(table)
            for i, block in enumerate(table):
                holders.setdefault(block, []).append((rid, i))
        for hs in holders.values():
            if len(hs) > 1:  # only full blocks of identical prefixes are shared, at the same index
                prefixes = {tuple(known[rid][:(i + 1) * tpb]) for rid, i in hs}
                assert len(prefixes) == 1 and len(next(iter(prefixes))) % tpb == 0 and len({i for _, i in hs}) == 1
        assert self.cpp.stats()["used_blocks"] == len(holders)  # exact accounting: no leak, no double free

    def check_kv(self, b, known):
        """Simulates the KV cache: every slot attention reads this step holds the K/V of the right prefix."""
        slots = b.slot_mapping.tolist()
        assert len(set(slots)) == len(slots)  # no two tokens write one slot
        rows = list(zip(b.request_ids.tolist(), b.query_lens.tolist(), b.context_lens.tolist()))
        offset = 0
        for rid, q, ctx in rows:  # writes
            for p, slot in zip(range(ctx - q, ctx), slots[offset: offset + q]):
                self.kv[slot] = tuple(known[rid][: p + 1])
            offset += q
        for row, (rid, _, ctx) in enumerate(rows):  # reads: positions 0 .. ctx-1 through the block table
            table = b.block_tables[row].tolist()
            for p in range(ctx):
                assert self.kv.get(table[p // self.tpb] * self.tpb + p % self.tpb) == tuple(known[rid][: p + 1])

    def check_outputs(self, out, known):
        for rid, token, reason in out:
            if reason == "cancelled":
                assert token == -1
                continue
            prompt, max_new, end_id, stop_words = self.requests[rid]
            generated = known[rid][len(prompt):] + [token]
            assert self.cpp.output_tokens(rid) == generated
            limit = min(max_new, self.max_seq_len - len(prompt), self.num_blocks * self.tpb - len(prompt) + 1)
            stop = any(generated[-len(w):] == w for w in stop_words if len(w) <= len(generated))
            expected = ("end_id" if token == end_id else "stop_words" if stop else
                        "length" if len(generated) >= limit else None)
            assert reason == expected
            assert len(prompt) + len(generated) <= self.max_seq_len
            if reason is not None:
                del self.requests[rid]
                self.finished.add(rid)

    @invariant()
    def same_state_and_exact_accounting(self):
        if not hasattr(self, "cpp"):
            return
        stats = self.cpp.stats()
        assert stats == self.py.stats()
        assert stats["free_blocks"] + stats["used_blocks"] + stats["cached_blocks"] == self.num_blocks
        assert (self.cpp.num_waiting(), self.cpp.num_running()) == (self.py.num_waiting(), self.py.num_running())
        assert self.cpp.num_waiting() + self.cpp.num_running() == len(self.requests)


def test_twins_agree_under_pressure():
    """Seeded long runs on tight pools: many preemptions, chunked prefills, prefix hits and collisions."""
    totals = {"num_preemptions": 0, "reused_tokens": 0}
    for seed in range(12):
        rng = random.Random(seed)
        m = SchedulerMachine()
        m.setup(num_blocks=rng.randint(3, 10), tpb=rng.randint(1, 4), max_batch_size=rng.randint(2, 6),
                max_num_tokens=rng.randint(2, 24), max_seq_len=rng.randint(8, 48), reuse=seed % 4 != 3,
                hash_bits=[64, 2][seed % 2])
        for _ in range(300):
            if rng.random() < 0.3:
                suffix = [rng.randint(1, 9) for _ in range(rng.randint(0, 6))]
                stop_words = [[rng.randint(1, 9)] * 2] * rng.randint(0, 1)
                m.add_request(rng.choice(BASE_PROMPTS), rng.randint(0, 8), suffix, rng.randint(1, 30),
                              rng.choice([-1, 0]), stop_words)
            if m.requests and rng.random() < 0.03:
                rid = rng.choice(sorted(m.requests))
                assert m.cpp.cancel(rid) and m.py.cancel(rid)
                del m.requests[rid]
                m.finished.add(rid)
            m.do_step([rng.randint(0 if rng.random() < 0.1 else 1, 9) for _ in range(64)])
            m.same_state_and_exact_accounting()
        m.run_to_completion([rng.randint(1, 9) for _ in range(64)])
        for key in totals:
            totals[key] += m.cpp.stats()[key]
    assert totals["num_preemptions"] > 50 and totals["reused_tokens"] > 100


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_scheduler_twins_agree = SchedulerMachine.TestCase


def signed(h: int) -> int:
    return h - (1 << 64) if h >= 1 << 63 else h


def test_kv_events_report_registered_and_evicted_blocks():
    """Each block registered for prefix reuse is reported once (its chain hash, the previous block's, its
    tokens), each registered block evicted once; nothing is kept before record_kv_events or after off."""
    s = _core.Scheduler(num_blocks=6, tokens_per_block=4, max_batch_size=2, max_num_tokens=64, max_seq_len=32)
    bm = _core.BlockManager(6, 4)  # for hash_block only
    s.add_request(0, list(range(10, 19)), max_new_tokens=1)  # 9 tokens: two full blocks
    s.schedule(), s.update([5])
    assert s.take_kv_events() == []  # not recording yet
    s.record_kv_events(True)
    prompt = list(range(20, 29))
    s.add_request(1, prompt, max_new_tokens=1)
    s.schedule(), s.update([5])
    h0 = bm.hash_block(0, prompt[:4])
    h1 = bm.hash_block(h0, prompt[4:8])
    assert s.take_kv_events() == [(True, signed(h0), None, prompt[:4]), (True, signed(h1), signed(h0), prompt[4:8])]
    assert s.take_kv_events() == []  # taken
    # A prompt needing the whole pool evicts the four cached blocks.
    s.add_request(2, list(range(40, 61)), max_new_tokens=1)
    s.schedule(), s.update([5])
    events = s.take_kv_events()
    removed = [h for stored, h, _, _ in events if not stored]
    first = bm.hash_block(0, list(range(10, 14)))
    assert sorted(removed) == sorted([signed(first), signed(bm.hash_block(first, list(range(14, 18)))),
                                      signed(h0), signed(h1)])
    assert [t for stored, _, _, t in events if stored] == [list(range(a, a + 4)) for a in range(40, 60, 4)]
    s.record_kv_events(False)
    s.add_request(3, list(range(60, 69)), max_new_tokens=1)
    s.schedule(), s.update([5])
    assert s.take_kv_events() == []


def test_draft_tokens_are_fed_after_the_decodes_and_rejected_ones_roll_back():
    """A decode with a draft feeds its last token + the draft as one chunk after the plain decodes; update()
    with counts keeps the accepted tokens' K/V, frees the tail blocks of the rejected ones, and a request
    finishing inside its accepted tokens stops there."""
    s = _core.Scheduler(num_blocks=16, tokens_per_block=4, max_batch_size=4, max_num_tokens=64, max_seq_len=64)
    s.add_request(0, [1, 2, 3], max_new_tokens=20, end_id=8)
    s.add_request(1, [5, 6, 7], max_new_tokens=20)
    s.schedule(), s.update([10, 20])  # prefills: each has one known token to feed
    assert s.set_draft(0, [11, 12, 13, 14, 15, 16])
    assert not s.set_draft(99, [1])
    b = s.schedule()
    assert b.request_ids.tolist() == [1, 0] and b.query_lens.tolist() == [1, 7]  # plain decode first
    assert b.num_decode_tokens == 1 and b.draft_lens.tolist() == [0, 6] and b.sample.tolist() == [True, True]
    assert b.input_ids.tolist() == [20, 10, 11, 12, 13, 14, 15, 16] and b.positions.tolist()[1:] == list(range(3, 10))
    assert len(s.block_table(0)) == 3  # positions 0..9
    out = s.update([21, 11, 12, 99], counts=[1, 3])  # request 0 keeps 11, 12; the target says 99 after them
    assert out == [(1, 21, None), (0, 11, None), (0, 12, None), (0, 99, None)]
    assert s.output_tokens(0) == [10, 11, 12, 99]
    assert len(s.block_table(0)) == 2  # 6 tokens computed (1, 2, 3, 10, 11, 12): the third block is freed
    b = s.schedule()  # no draft set: plain decodes in admission order; request 0 feeds 99 at position 6
    assert b.input_ids.tolist() == [99, 21] and b.positions.tolist() == [6, 4] and b.draft_lens.tolist() == [0, 0]
    s.update([100, 22])
    s.set_draft(0, [7, 8])
    s.add_request(2, [9, 9], max_new_tokens=3)
    b = s.schedule()
    assert b.request_ids.tolist() == [1, 0, 2]
    out = s.update([23, 7, 8, 5, 30], counts=[1, 3, 1])  # request 0's 8 is its end_id: the 5 after it is dropped
    assert out == [(1, 23, None), (0, 7, None), (0, 8, "end_id"), (2, 30, None)]
    assert s.block_table(0) == [] and s.stats()["used_blocks"] == len(s.block_table(1)) + len(s.block_table(2))
    with pytest.raises(ValueError, match="counts"):
        s.schedule(), s.update([1, 2], counts=[1])

"""KV-cache block manager: allocation, reference counts, prefix reuse, collisions, LRU eviction, accounting.

Every test runs on the C++ core and on its pure-Python twin (the oracle).
"""

import random

import pytest
from oracles import py_scheduler

from trtc import _core

IMPLS = {"cpp": _core.BlockManager, "py": py_scheduler.BlockManager}


@pytest.fixture(params=list(IMPLS))
def BM(request):
    return IMPLS[request.param]


def accounting(bm):
    assert bm.num_free_blocks + bm.num_used_blocks + bm.num_cached_blocks == bm.num_blocks
    return bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks


def test_allocation_and_release(BM):
    bm = BM(8, 4)
    assert bm.admit(1, list(range(10))) == 0  # nothing cached yet
    table = bm.block_table(1)
    assert len(table) == 3 and len(set(table)) == 3  # ceil(10 / 4)
    assert [bm.ref_count(b) for b in table] == [1, 1, 1]
    assert accounting(bm) == (5, 3, 0)
    assert bm.append_slots(1, 12)  # still 3 blocks
    assert len(bm.block_table(1)) == 3
    assert bm.append_slots(1, 13)
    assert len(bm.block_table(1)) == 4 and accounting(bm) == (4, 4, 0)
    bm.release(1)
    assert not bm.has_sequence(1)
    assert accounting(bm) == (8, 0, 0)  # nothing was hashed, so nothing is cached
    assert all(bm.ref_count(b) == 0 for b in range(8))


def test_admit_and_append_fail_without_change(BM):
    bm = BM(4, 4)
    assert bm.admit(1, list(range(17))) == -1  # needs 5 blocks
    assert not bm.has_sequence(1) and accounting(bm) == (4, 0, 0)
    assert bm.admit(2, list(range(12))) == 0
    assert not bm.append_slots(2, 17)  # needs 2 more, 1 left
    assert len(bm.block_table(2)) == 3 and accounting(bm) == (1, 3, 0)


def test_prefix_hit_shares_full_blocks(BM):
    bm = BM(8, 4)
    a = list(range(10))
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 10)  # blocks 0 and 1 are full: registered
    ta = bm.block_table(1)
    assert [bm.is_hashed(b) for b in ta] == [True, True, False]
    b = a[:8] + [99, 98, 97]
    assert bm.admit(2, b) == 8
    tb = bm.block_table(2)
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert [bm.ref_count(x) for x in ta] == [2, 2, 1]
    assert accounting(bm) == (4, 4, 0)  # 3 + 3 blocks in tables, 2 of them shared
    bm.release(1)
    assert [bm.ref_count(x) for x in tb] == [1, 1, 1]
    assert accounting(bm) == (5, 3, 0)  # A's partial block went back to free


def test_match_stops_before_last_token(BM):
    """At least one token is always computed, so a fully cached prompt still leaves its last block to compute."""
    bm = BM(8, 4)
    a = list(range(8))
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 8)
    assert bm.admit(2, a) == 4  # only the block strictly before the last token
    assert bm.block_table(2)[0] == bm.block_table(1)[0]
    assert bm.block_table(2)[1] != bm.block_table(1)[1]  # the block that will be written is never shared
    assert bm.admit(3, a[:5]) == 4


def test_prefix_is_a_hash_chain(BM):
    """A block matches only if every block before it matches too."""
    bm = BM(8, 2)
    a = [1, 2, 3, 4, 5]
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 4)
    assert bm.admit(2, [9, 9, 3, 4, 5]) == 0  # same second block, different first
    assert bm.admit(3, [1, 2, 9, 9, 5]) == 2


def test_prefix_miss_and_reuse_disabled(BM):
    bm = BM(8, 4, enable_prefix_reuse=False)
    a = list(range(10))
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 10)
    assert not any(bm.is_hashed(b) for b in bm.block_table(1))
    assert bm.admit(2, a) == 0
    bm.release(1)
    bm.release(2)
    assert accounting(bm) == (8, 0, 0)


def test_released_hashed_blocks_are_cached_and_reclaimed(BM):
    bm = BM(4, 4)
    a = list(range(10))
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 10)
    blocks = bm.block_table(1)
    bm.release(1)
    assert accounting(bm) == (2, 0, 2)  # two hashed full blocks stay cached, the partial one is free
    # Needs 3 blocks: 2 from the cache (reclaimed, not evicted) + 1 new. Available = 2 free + 2 cached - 2.
    assert bm.admit(2, a[:8] + [7]) == 8
    assert bm.block_table(2)[:2] == blocks[:2]
    assert accounting(bm) == (1, 3, 0)
    # A request that needs the reclaimed blocks AND all remaining blocks is refused: reclaimed blocks don't count.
    bm.release(2)
    assert bm.admit(3, a[:8] + list(range(50, 59))) == -1  # 2 cached + 3 new > 2 free + 2 cached - 2
    assert accounting(bm) == (2, 0, 2)


def colliding_blocks(bm, tpb):
    """Two different token blocks with the same (truncated) hash."""
    seen = {}
    rng = random.Random(0)
    while True:
        tokens = [rng.randrange(1000) for _ in range(tpb)]
        h = bm.hash_block(0, tokens)
        if h in seen and seen[h] != tokens:
            return seen[h], tokens
        seen[h] = tokens


def test_hash_collision_never_reuses_wrong_blocks(BM):
    bm = BM(8, 4, hash_bits=2)
    x, y = colliding_blocks(bm, 4)
    bm.admit(1, x + [1])
    bm.cache_full_blocks(1, x + [1], 4)
    assert bm.admit(2, y + [1]) == 0  # hash hit, tokens differ: miss
    assert set(bm.block_table(1)).isdisjoint(bm.block_table(2))
    bm.cache_full_blocks(2, y + [1], 4)  # same hash already registered: y's block stays unhashed
    assert not bm.is_hashed(bm.block_table(2)[0])
    assert bm.admit(3, x + [2]) == 4  # the true owner still matches
    bm.release(2)
    assert accounting(bm) == (5, 3, 0)


def test_duplicate_content_keeps_first_registration(BM):
    bm = BM(8, 2)
    a = [1, 2, 3]
    bm.admit(1, a)
    bm.admit(2, a)  # admitted before 1 registered anything: no sharing
    bm.cache_full_blocks(1, a, 2)
    bm.cache_full_blocks(2, a, 2)
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert bm.is_hashed(t1[0]) and not bm.is_hashed(t2[0])
    bm.release(2)
    assert accounting(bm) == (8 - 2, 2, 0)  # 2's blocks are plain free
    bm.release(1)
    assert accounting(bm) == (7, 0, 1)


def test_lru_eviction_order(BM):
    bm = BM(3, 2)
    for seq, tokens in [(1, [1, 2]), (2, [3, 4]), (3, [5, 6])]:
        bm.admit(seq, tokens)
        bm.cache_full_blocks(seq, tokens, 2)
    block = {seq: bm.block_table(seq)[0] for seq in (1, 2, 3)}
    for seq in (2, 1, 3):  # LRU order: 2, 1, 3
        bm.release(seq)
    assert accounting(bm) == (0, 0, 3)
    assert bm.admit(4, [7, 8]) == 0
    assert bm.block_table(4) == [block[2]]  # least recently freed is evicted first, and loses its hash
    assert not bm.is_hashed(block[2])
    assert bm.admit(5, [1, 2, 9]) == 2  # 1's block is reclaimed from the cache; 3's is evicted for the tail
    assert bm.block_table(5) == [block[1], block[3]]
    assert accounting(bm) == (0, 3, 0)
    bm.release(4)
    bm.release(5)
    assert bm.admit(6, [3, 4, 9]) == 0  # 2's prefix was evicted
    bm.release(6)
    assert bm.admit(7, [5, 6, 9]) == 0  # and so was 3's
    bm.release(7)
    assert bm.admit(8, [1, 2, 9]) == 2  # 1's, reclaimed and released again, is still cached


def test_release_frees_tail_first(BM):
    """A released sequence's tail blocks are evicted before its prefix blocks."""
    bm = BM(3, 1)
    a = [1, 2, 3]
    bm.admit(1, a)
    bm.cache_full_blocks(1, a, 3)
    table = bm.block_table(1)
    bm.release(1)
    bm.admit(2, [9])
    assert bm.block_table(2) == [table[2]]
    bm.release(2)  # unhashed: back to free
    assert bm.admit(3, [1, 2, 5]) == 2  # the two-block prefix survived


def test_hash_is_identical_in_cpp_and_python():
    rng = random.Random(1)
    for tpb in (1, 4, 16):
        for bits in (64, 20):
            c, p = _core.BlockManager(4, tpb, hash_bits=bits), py_scheduler.BlockManager(4, tpb, hash_bits=bits)
            parent = 0
            for _ in range(20):
                tokens = [rng.randrange(1 << 31) for _ in range(tpb)]
                assert c.hash_block(parent, tokens) == p.hash_block(parent, tokens)
                parent = c.hash_block(parent, tokens)


@pytest.mark.parametrize("args", [(0, 4), (4, 0), (4, 4, True, 0), (4, 4, True, 65)])
def test_bad_arguments(BM, args):
    with pytest.raises(ValueError, match="must be"):
        BM(*args)


def test_collision_across_chains_never_reuses_wrong_blocks(BM):
    """Same block tokens under another prefix hold other K/V: a chain-hash collision must not match them."""
    bm = BM(16, 2, hash_bits=2)
    x = next([a, b] for a in range(100) for b in range(100)
             if bm.hash_block(bm.hash_block(0, [a, b]), [a, b]) == bm.hash_block(0, [a, b]))
    bm.admit(1, x + [1])
    bm.cache_full_blocks(1, x + [1], 2)
    # Block 1 of x + x has block 0's tokens and (2-bit) hash, but its K/V sits at other positions.
    assert bm.admit(2, x + x + [2]) == 2
    assert len(set(bm.block_table(2))) == 3
    bm.cache_full_blocks(2, x + x + [2], 4)
    assert bm.admit(3, x + x + [3]) == 2  # 2's block 1 could not be registered (its hash is taken)
    assert len(set(bm.block_table(3))) == 3

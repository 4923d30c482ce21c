"""
trtc runtime core: KV-cache block manager and in-flight-batching scheduler (pure C++).
"""

from collections.abc import Sequence
from typing import Annotated, overload

import numpy
import numpy.typing
from numpy.typing import NDArray

class BlockManager:
    """Paged KV-cache block pool with prefix reuse (see cpp/block_manager.h)."""

    def __init__(self, num_blocks: int, tokens_per_block: int, enable_prefix_reuse: bool = True, hash_bits: int = 64) -> None: ...

    def admit(self, seq_id: int, tokens: Sequence[int], reuse_prefix: bool = True, salt: int = 0) -> int: ...

    def append_slots(self, seq_id: int, num_tokens: int) -> bool: ...

    def cache_full_blocks(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None: ...

    def release(self, seq_id: int) -> None: ...

    def has_sequence(self, seq_id: int) -> bool: ...

    def block_table(self, seq_id: int) -> list[int]: ...

    def ref_count(self, block_id: int) -> int: ...

    def is_hashed(self, block_id: int) -> bool: ...

    def hash_block(self, parent_hash: int, tokens: Sequence[int]) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def tokens_per_block(self) -> int: ...

    @property
    def num_free_blocks(self) -> int: ...

    @property
    def num_cached_blocks(self) -> int: ...

    @property
    def num_used_blocks(self) -> int: ...

class ScheduledBatch:
    """
    One step's batch: B requests, decodes first, then prefill chunks; T = sum(query_lens) tokens. Arrays are numpy, own their memory and stay valid after the next schedule().
    """

    @property
    def request_ids(self, /) -> numpy.typing.NDArray[numpy.int64]:
        """[B] the scheduled requests"""

    @property
    def query_lens(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """[B] tokens fed this step (1 for a decode, a chunk for a prefill)"""

    @property
    def context_lens(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """[B] K/V length after this step: tokens already cached + query_len"""

    @property
    def input_ids(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """[T] the requests' fed tokens, concatenated in batch order"""

    @property
    def positions(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """[T] absolute position of each fed token"""

    @property
    def slot_mapping(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """
        [T] block_id * tokens_per_block + offset: where each fed token's K/V is written
        """

    @property
    def block_tables(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """[B, max_blocks_in_batch] block ids per request, padded with -1"""

    @property
    def sample(self, /) -> numpy.typing.NDArray[numpy.bool]:
        """
        [B] this chunk reaches the last known token: the request yields a token
        """

    @property
    def draft_lens(self, /) -> numpy.typing.NDArray[numpy.int32]:
        """
        [B] draft tokens fed after the last known token (0: none); each fed token from the last known one on wants its logits (1 + draft_len rows)
        """

    @property
    def num_prefill_tokens(self) -> int: ...

    @property
    def num_decode_tokens(self) -> int:
        """the first num_decode_tokens requests are the decodes"""

    @property
    def preempted(self) -> list[int]:
        """requests preempted by this schedule()"""

    def __len__(self) -> int: ...

    def __repr__(self) -> str: ...

class Scheduler:
    """
    In-flight batching over the paged KV cache. One executor step crosses into C++ twice, with batched data: batch = schedule(); run the model and sample a token for each request with batch.sample set; update(tokens) -> (request_id, token, finish_reason | None) per sampled request.

    num_blocks x tokens_per_block is the KV-cache pool; max_num_tokens is the token budget per step (tokens fed), max_batch_size the requests per step. hash_bits truncates block hashes (a test hook only).
    """

    def __init__(self, num_blocks: int, tokens_per_block: int, max_batch_size: int, max_num_tokens: int, max_seq_len: int, enable_prefix_reuse: bool = True, *, hash_bits: int = 64) -> None: ...

    def add_request(self, request_id: int, prompt: Sequence[int], max_new_tokens: int, end_id: int = -1, stop_words: Sequence[Sequence[int]] = [], reuse_prefix: bool = True, salt: int = 0) -> None:
        """
        Queue a request (first come, first served); reuse_prefix=False computes every prompt token (none taken from cached blocks; its own full blocks are still cached for others). salt keys its blocks in the prefix cache besides their tokens (a LoRA adapter: only requests of the same salt share blocks; 0 for none). ValueError for an empty prompt, a duplicate id, max_new_tokens < 1, a prompt of max_seq_len tokens or more, a prompt that could never fit the pool, an empty stop word. max_new_tokens is clipped so that prompt + generated <= max_seq_len and the request alone always fits the pool (it then finishes with "length").
        """

    def cancel(self, request_id: int) -> bool:
        """
        True if the request was waiting or running: its blocks are freed at once and the next update() reports (request_id, -1, "cancelled"). A request cancelled between schedule() and update() is skipped by update().
        """

    def schedule(self) -> ScheduledBatch:
        """
        One step: (1) running decodes in admission order, preempting the most recently admitted running request when a block is missing (its full computed blocks stay cached; it re-queues at the front and later recomputes prompt + generated); (2) running chunked prefills continue; (3) waiting requests are admitted first come first served while batch slots, token budget and blocks allow. A new request reuses cached full blocks of a matching prefix.
        """

    def rewind(self, request_id: int, num_tokens: int, tokens: Sequence[int]) -> bool:
        """
        A draft model's mirror of a target request: keep its first num_tokens tokens (and their K/V: tail blocks freed), then append `tokens` as known tokens to compute. False unless running or waiting.
        """

    def set_draft(self, request_id: int, draft: Sequence[int]) -> bool:
        """
        Speculation: the next schedule() feeds `draft` after the request's last known token if it is decoding then (clipped to its max_new_tokens, max_seq_len and the step's token budget; dropped when its blocks do not fit). False, and nothing kept, unless the request is running.
        """

    @overload
    def update(self, tokens: Annotated[NDArray[numpy.int64], dict(shape=(None,), device='cpu', writable=False)], counts: Sequence[int] = []) -> list: ...

    @overload
    def update(self, tokens: Annotated[NDArray[numpy.int32], dict(shape=(None,), device='cpu', writable=False)], counts: Sequence[int] = []) -> list: ...

    @overload
    def update(self, tokens: Sequence[int], counts: Sequence[int] = []) -> list[tuple[int, int, str | None]]:
        """
        Call exactly once after every schedule(). tokens: one per request with sample set, in batch order (a list, or a numpy / CPU torch int array); with counts, counts[k] tokens for the k-th such request: 1 + the draft tokens it accepted (its K/V past them is dropped). Returns one tuple per token in batch order, then one (request_id, -1, "cancelled") per request cancelled since the last update(). finish_reason is "end_id" (token == end_id, included), "stop_words" (the generated tokens end with a stop word, included) or "length". Finished requests free their blocks (full hashed blocks stay cached).
        """

    def has_unfinished(self) -> bool:
        """
        True while requests wait or run, or a cancellation is still to be reported by update().
        """

    def num_waiting(self) -> int: ...

    def num_running(self) -> int: ...

    def output_tokens(self, request_id: int) -> list[int]:
        """
        Tokens generated so far; kept after the request finishes until pop(request_id).
        """

    def pop(self, request_id: int) -> list[int]: ...

    def block_table(self, request_id: int) -> list[int]:
        """The request's block ids; empty unless running."""

    def record_kv_events(self, on: bool = True) -> None:
        """
        Keep an event for every block registered for prefix reuse and every registered block evicted, until take_kv_events(); off drops those kept.
        """

    def take_kv_events(self) -> list[tuple[bool, int, int | None, list[int]]]:
        """
        The events since the last call, in order: (True, hash, parent hash or None for a first block, its tokens) for a block registered, (False, hash, None, []) for one evicted. Hashes are signed 64-bit.
        """

    def stats(self) -> dict[str, int]:
        """
        num_blocks, free_blocks, used_blocks, cached_blocks (the three always sum to num_blocks), reused_tokens (tokens served from cached blocks), num_preemptions.
        """

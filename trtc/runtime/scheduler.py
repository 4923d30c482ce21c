"""The runtime's scheduler: KV-cache block manager + in-flight batching, implemented in C++ (``trtc._core``).

One executor step crosses into C++ twice, with batched data::

    batch = scheduler.schedule()             # ScheduledBatch: numpy arrays for the whole step
    tokens = runner.forward(batch)           # one sampled token per request with batch.sample[i]
    for request_id, token, finish_reason in scheduler.update(tokens):
        ...                                  # stream token; finish_reason is None while generating

Scheduler(num_blocks, tokens_per_block, max_batch_size, max_num_tokens, max_seq_len, enable_prefix_reuse=True)
    num_blocks x tokens_per_block is the KV-cache pool; max_num_tokens is the token budget per step (tokens fed),
    max_batch_size the requests per step. (Keyword ``hash_bits`` truncates block hashes: a test hook only.)

add_request(request_id, prompt, max_new_tokens, end_id=-1, stop_words=[])
    Queues a request (FCFS). ValueError for an empty prompt, a duplicate id, max_new_tokens < 1, a prompt of
    max_seq_len tokens or more, a prompt that could never fit the pool, an empty stop word. max_new_tokens is
    clipped so prompt + generated <= max_seq_len and so the request alone always fits the pool (it then
    finishes with "length").
cancel(request_id) -> bool
    True if it was waiting or running; its blocks are freed at once and the next update() reports
    (request_id, -1, "cancelled"). A request cancelled between schedule() and update() is skipped by update().
schedule() -> ScheduledBatch
    Builds one step: (1) running decodes in admission order, preempting the most recently admitted running
    request when a block is missing (its full computed blocks stay cached; it re-queues at the front and later
    recomputes prompt + generated); (2) running chunked prefills continue; (3) waiting requests are admitted
    first come first served while batch slots, token budget and blocks allow. Prompts longer than the budget
    are prefilled in chunks over several steps. A new request reuses cached full blocks of a matching prefix.
update(tokens) -> list[(request_id, token, finish_reason | None)]
    Call exactly once after every schedule(). tokens: list, numpy or CPU torch int array, one per request with
    sample=True, in batch order. Returns one tuple per sampled request in batch order, then one
    (request_id, -1, "cancelled") per request cancelled since the last update(). finish_reason is "end_id"
    (token == end_id, token included), "stop_words" (generated tokens end with a stop word, included) or
    "length". Finished requests free their blocks (full hashed blocks stay in the cache for reuse).
has_unfinished()  True while requests wait or run, or a cancellation is still to be reported by update().
num_waiting(), num_running(), block_table(request_id) -> list[int] (empty unless running)
output_tokens(request_id) -> list[int]   tokens generated so far; kept after finishing until pop(request_id).
stats() -> dict  num_blocks, free_blocks, used_blocks, cached_blocks (the three always sum to num_blocks),
                 reused_tokens (tokens served from cached blocks), num_preemptions.

ScheduledBatch (B requests; decodes first, then prefill chunks; T = sum(query_lens) tokens):
    request_ids   [B] int64
    query_lens    [B] int32    tokens fed this step (1 for a decode, a chunk for a prefill)
    context_lens  [B] int32    K/V length after this step: tokens already cached + query_len
    input_ids     [T] int32    the requests' fed tokens, concatenated in batch order
    positions     [T] int32    absolute position of each fed token
    slot_mapping  [T] int32    block_id * tokens_per_block + offset, where each fed token's K/V is written
    block_tables  [B, max_blocks_in_batch] int32, padded with -1
    sample        [B] bool     this chunk reaches the last known token: the request yields a token this step
    num_decode_tokens, num_prefill_tokens: int   (the first num_decode_tokens requests are the decodes)
    preempted     list[int]    requests preempted by this schedule()
All arrays are numpy, own their memory, and stay valid after the next schedule(). len(batch) == B.
"""

from trtc._core import BlockManager, ScheduledBatch, Scheduler

__all__ = ["BlockManager", "ScheduledBatch", "Scheduler"]

"""trtc's KV block events as Dynamo's KV publisher takes them.

The scheduler reports each block it registers for prefix reuse (its chained hash, the previous
block's hash, its tokens) and each registered block it evicts (trtc/runtime/messages.py
KvBlockEvent). Dynamo's router hashes the tokens itself (its block size is the engine's
tokens_per_block, given at registration); trtc's hashes name the blocks for parent links and removal.
Consecutive stored blocks of one chain go out as one `publish_stored` call, consecutive removals as
one `publish_removed`.
"""

from __future__ import annotations

from trtc.runtime.messages import KvBlockEvent


def publisher_calls(events: list[KvBlockEvent]) -> list[tuple[str, dict]]:
    """[(method name, keyword arguments)] for a KvEventPublisher, in the events' order."""
    calls: list[tuple[str, dict]] = []
    for e in events:
        last = calls[-1] if calls else None
        if not e.stored:
            if last is not None and last[0] == "publish_removed":
                last[1]["block_hashes"].append(e.block_hash)
            else:
                calls.append(("publish_removed", {"block_hashes": [e.block_hash]}))
            continue
        if (last is not None and last[0] == "publish_stored" and e.parent_hash is not None
                and last[1]["block_hashes"][-1] == e.parent_hash):
            last[1]["token_ids"].extend(e.token_ids)
            last[1]["num_block_tokens"].append(len(e.token_ids))
            last[1]["block_hashes"].append(e.block_hash)
        else:
            calls.append(("publish_stored", {"token_ids": list(e.token_ids), "num_block_tokens": [len(e.token_ids)],
                                             "block_hashes": [e.block_hash], "parent_hash": e.parent_hash}))
    return calls

"""The draft_target proposer: a small draft engine of the same vocabulary guesses k tokens for each
speculating request, greedily, in k steps of its own executor (its own paged KV cache), batched over
the requests. Each target request has a mirror request in the draft executor whose tokens follow the
target's: before proposing, a mirror keeps the tokens it shares with its target (and their K/V) and
takes the target's newer tokens (Scheduler.rewind), so rejected drafts cost the draft nothing later.
The draft's choice is deterministic given its context, so verification treats it as the n-gram
proposer's (a one-hot draft distribution: trtc/runtime/speculative.py)."""

from __future__ import annotations

from trtc.errors import TrtcError
from trtc.runtime.sampling_params import SamplingParams


class DraftModel:
    """executor: an Executor over the draft engine, owned by this proposer."""

    def __init__(self, executor, target_engine) -> None:
        draft, target = executor.engine, target_engine
        if draft.graph.vocab_size != target.graph.vocab_size:
            executor.close()
            raise TrtcError(f"the draft engine's vocabulary ({draft.graph.vocab_size} tokens) is not the target's "
                            f"({target.graph.vocab_size}); the draft must share the target's tokenizer")
        for name in ("max_batch_size", "max_seq_len"):
            if getattr(draft.build_config, name) < getattr(target.build_config, name):
                executor.close()
                raise TrtcError(f"the draft engine's {name} {getattr(draft.build_config, name)} is below the target's "
                                f"{getattr(target.build_config, name)}; rebuild the draft with --{name} "
                                f"{getattr(target.build_config, name)}")
        self.ex = executor
        self.mirror: dict[int, int] = {}  # target request id -> its mirror's id in the draft executor

    def propose(self, targets: dict[int, list[int]], k: int) -> dict[int, list[int]]:
        """targets: each speculating target request's known tokens (prompt + output). Returns up to k
        draft tokens for each (fewer for a mirror still computing its prompt)."""
        sched = self.ex.scheduler
        for rid, tokens in targets.items():
            m = self.mirror.get(rid)
            if m is not None and m not in self.ex.requests:  # the mirror ended (its length): start a new one
                del self.mirror[rid]
                m = None
            if m is None:
                room = self.ex.engine.build_config.max_seq_len - len(tokens)
                self.mirror[rid] = self.ex.add_request(tokens, SamplingParams(max_tokens=room, end_id=-1))
                continue
            state = self.ex.requests[m]
            have = state.prompt_ids + state.output_ids
            common = next((i for i, (a, b) in enumerate(zip(have, tokens)) if a != b), min(len(have), len(tokens)))
            sched.rewind(m, common, tokens[common:])
            state.output_ids = tokens[len(state.prompt_ids):]
        for _ in range(k):
            self.ex.step()
        drafts = {}
        for rid, tokens in targets.items():
            state = self.ex.requests.get(self.mirror[rid])
            if state is not None:
                drafts[rid] = (state.prompt_ids + state.output_ids)[len(tokens): len(tokens) + k]
        return drafts

    def release(self, target_id: int) -> None:
        """The target request ended: its mirror is cancelled (ended at the draft's next step)."""
        m = self.mirror.pop(target_id, None)
        if m is not None and self.ex.cancel(m):  # its blocks are freed now; its state goes with it
            self.ex.scheduler.pop(m)
            del self.ex.requests[m]

    def close(self) -> None:
        self.ex.close()

"""LLM.generate_async: requests from many asyncio tasks join one in-flight batch on the engine thread
and give exactly LLM.generate's outputs; abort frees the KV blocks; a tp 2 engine serves the same."""

from __future__ import annotations

import asyncio

import pytest
from serve_helpers import stories260k

from trtc import SamplingParams
from trtc.errors import TrtcError
from trtc.llm import LLM

PROMPTS = ["Once upon a time", "The dog", "Lily saw a big", "One day, Tom"]


@pytest.fixture(scope="module")
def offline():
    with LLM(stories260k(), device="cpu") as llm:
        yield llm


def test_tasks_share_the_batch_and_match_generate(offline):
    params = [SamplingParams(max_tokens=10 + i) for i in range(40)]
    prompts = [PROMPTS[i % 4] for i in range(40)]
    want = offline.generate(prompts, params)
    with LLM(stories260k(), device="cpu") as llm:
        async def main():
            outs = await asyncio.gather(*[llm.generate_async(p, sp) for p, sp in zip(prompts, params)])
            snapshots = [o async for o in llm.generate_async(PROMPTS[0], params[0])]
            return outs, snapshots

        outs, snapshots = asyncio.run(main())
        assert llm.async_engine.stats.num_running == 0
        with pytest.raises(TrtcError, match="generate_async"):
            llm.generate("x")
    assert [o.text for o in outs] == [w.text for w in want]
    assert [o.token_ids for o in outs] == [w.token_ids for w in want]
    assert [o.finish_reason for o in outs] == ["length"] * 40
    assert snapshots[-1].text == want[0].text and snapshots[-1].finished
    assert [len(s.token_ids) for s in snapshots] == list(range(1, 11))  # one snapshot per token


def test_abort_frees_kv_blocks_and_stop_strings_end_requests(offline):
    want = offline.generate(PROMPTS[0], SamplingParams(max_tokens=30)).text
    with LLM(stories260k(), device="cpu") as llm:
        async def main():
            long = [llm.generate_async(p, SamplingParams(max_tokens=400)) for p in PROMPTS]
            await asyncio.sleep(0.2)
            for s in long:
                s.abort()
            outs = await asyncio.gather(*long)
            stopped = await llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=30, stop=["Lily"]))
            await asyncio.sleep(0.1)  # the stop string's cancel reaches the engine at the next step boundary
            for _ in range(50):
                if llm.async_engine.stats.used_blocks == 0:
                    break
                await asyncio.sleep(0.1)
            return outs, stopped, llm.async_engine.stats

        outs, stopped, stats = asyncio.run(main())
    assert all(o.finish_reason == "cancelled" and len(o.token_ids) < 400 for o in outs)
    assert stats.used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert stopped.text == want[: want.index("Lily")] and stopped.finish_reason == "stop"


def test_a_bad_prompt_is_refused_before_it_reaches_the_engine(offline):
    async def main():
        offline_llm = LLM(stories260k(), device="cpu")
        try:
            with pytest.raises(TrtcError, match="max_seq_len 512"):
                offline_llm.generate_async([5] * 500, SamplingParams(max_tokens=20))
            return await offline_llm.generate_async(PROMPTS[1], SamplingParams(max_tokens=3))
        finally:
            offline_llm.close()

    assert asyncio.run(main()).token_ids == offline.generate(PROMPTS[1], SamplingParams(max_tokens=3)).token_ids


def test_tp2_engine_serves_async_requests_like_tp1(tp_engines):
    prompts = [[3 + (5 * i + j) % 120 for j in range(4 + i)] for i in range(6)]
    params = SamplingParams(max_tokens=12, end_id=-1)
    with LLM(tp_engines[1][1]) as tp1:
        want = [o.token_ids for o in tp1.generate(prompts, params)]
    with LLM(tp_engines[1][2]) as tp2:
        async def main():
            return await asyncio.gather(*[tp2.generate_async(p, params) for p in prompts])

        got = [o.token_ids for o in asyncio.run(main())]
    assert got == want


def test_samples_after_the_first_share_its_prompt_blocks(offline):
    """n samples of one prompt (the server's `n`): submitted with after=the first, the others start
    once its prompt is computed and take every full prompt block from the prefix cache; submitted
    together, none is cached yet. Seeded outputs equal separate requests with those seeds."""
    tpb = offline.executor.engine.build_config.tokens_per_block
    prompt = list(range(3, 3 + 3 * tpb + 5))  # 3 full blocks and a partial one
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=s) for s in range(4)]
    want = [o.token_ids for o in offline.generate([prompt] * 4, params)]
    for share in (True, False):
        with LLM(stories260k(), device="cpu") as llm:
            async def main(share=share, llm=llm):
                first = llm.generate_async(prompt, params[0])
                rest = [llm.generate_async(prompt, p, after=first if share else None) for p in params[1:]]
                return await asyncio.gather(first, *rest)

            outs = asyncio.run(main())
            reused = llm.executor.scheduler.stats()["reused_tokens"]
        assert [o.token_ids for o in outs] == want
        assert reused == (3 * 3 * tpb if share else 0), (share, reused)

"""trtc behind NVIDIA Dynamo (`python -m trtc.dynamo` workers, `python -m dynamo.frontend`), as a user
deploys it on one machine: file discovery, the TCP request plane, real processes on loopback.

Through the frontend with two stories260K workers: greedy completions and chat equal LLM.generate and
streams join to the same text; with `--router-mode kv` requests sharing a prefix go to the worker that
holds it (trtc's KV events), with round-robin they spread; clients that leave mid-stream free every
request and block; a worker killed while 50 streams run loses none of them (the frontend migrates
them) and the other serves what follows, and a restarted worker gets traffic again; 200 concurrent
streams end with 0 errors."""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest
from dynamo_helpers import MODEL, Cluster
from serve_helpers import CHAT_TEMPLATE, stories260k

from trtc import SamplingParams
from trtc.llm import LLM

PROMPTS = ["Once upon a time", "The dog", "Lily saw a big", "One day, Tom"]
# ~100 tokens shared by the routing test's requests (several KV blocks of 16 tokens)
PREFIX = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
          "friends. One day, she saw a big red ball under a tree. She ran to the ball and picked it up. Her mom "
          "smiled and said that they could take it home after lunch. ")
PREFIX_B = ("The big brown dog ran to the river every morning. He liked to swim and catch the fish that jumped out "
            "of the water. His friend the cat sat on a rock and watched him. When the sun was high, they went home "
            "together and slept under the old tree. ")
NAMES = ("Tom", "Sue", "Max", "Ann", "Ben", "Kim")


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=120, max_retries=0)


def run(coro, timeout: float = 180):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def stream_text(c: openai.AsyncOpenAI, prompt: str, n: int) -> str:
    stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two workers; a KV-routing frontend and a round-robin one over them."""
    c = Cluster(tmp_path_factory.mktemp("dynamo"), stories260k())
    try:
        c.worker("w0")
        c.worker("w1")
        c.kv_url = c.frontend("--router-mode", "kv")
        c.rr_url = c.frontend("--router-mode", "round-robin")
        c.wait_ready(c.kv_url, 2)
        c.wait_ready(c.rr_url, 2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def offline():
    with LLM(stories260k(), device="cpu") as llm:
        yield llm


def unspecial(llm: LLM, text: str) -> list[int]:
    """The token ids Dynamo's frontend feeds for `text`: it tokenizes without special tokens (no BOS)."""
    return llm.tokenizer(text, add_special_tokens=False).input_ids


def test_completions_chat_and_streams_equal_offline(cluster, offline):
    lengths = [12, 20, 7, 16]
    want = [o.text for o in offline.generate([unspecial(offline, p) for p in PROMPTS],
                                             [SamplingParams(max_tokens=n) for n in lengths])]
    chat_prompt = "user: Tell me a story\nassistant:"  # CHAT_TEMPLATE rendered
    assert "{{ m['role'] }}: {{ m['content'] }}" in CHAT_TEMPLATE
    want_chat = offline.generate(unspecial(offline, chat_prompt), SamplingParams(max_tokens=16)).text

    async def main():
        async with client(cluster.kv_url) as c:
            plain = [await c.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0)
                     for p, n in zip(PROMPTS, lengths)]
            streamed = await asyncio.gather(*[stream_text(c, p, n) for p, n in zip(PROMPTS, lengths)])
            chat = await c.chat.completions.create(model=MODEL, max_tokens=16, temperature=0,
                                                   messages=[{"role": "user", "content": "Tell me a story"}])
            return plain, streamed, chat

    plain, streamed, chat = run(main())
    assert [r.choices[0].text for r in plain] == want
    assert [r.usage.completion_tokens for r in plain] == lengths
    assert all(r.choices[0].finish_reason == "length" for r in plain)
    assert streamed == want
    assert chat.choices[0].message.content == want_chat


def test_kv_routing_follows_the_prefix_and_round_robin_spreads(cluster):
    def served() -> dict[str, float]:
        return {w: cluster.served(w) for w in cluster.workers}

    async def send(url: str, prompts: list[str]) -> None:
        async with client(url) as c:
            for p in prompts:  # one after another: each sees the blocks the ones before it stored
                await c.completions.create(model=MODEL, prompt=p, max_tokens=2, temperature=0)

    def worker_of(url: str, prompts: list[str]) -> dict[str, float]:
        before = served()
        run(send(url, prompts))
        after = served()
        return {w: after[w] - before[w] for w in cluster.workers}

    # Round-robin places the two prefixes on different workers (and spreads six requests 3 / 3) ...
    seed_a, seed_b = worker_of(cluster.rr_url, [PREFIX + "Then"]), worker_of(cluster.rr_url, [PREFIX_B + "Then"])
    holder_a, holder_b = max(seed_a, key=seed_a.get), max(seed_b, key=seed_b.get)
    assert holder_a != holder_b, (seed_a, seed_b)
    spread = worker_of(cluster.rr_url, [f"So {name} ran" for name in NAMES])
    assert sorted(spread.values()) == [3, 3], spread
    time.sleep(1.0)  # the seeds' stored blocks reach the routers (the event plane)
    # ... and the KV router sends each request to the worker holding its prefix.
    hits = {w: cluster.metric(w, "trtc:prefix_cache_hits_total") for w in cluster.workers}
    assert worker_of(cluster.kv_url, [f"{PREFIX}Then {name} said" for name in NAMES])[holder_a] == 6
    assert worker_of(cluster.kv_url, [f"{PREFIX_B}Then {name} said" for name in NAMES])[holder_b] == 6
    for w in cluster.workers:  # every request reused its prefix's full blocks (96 of ~100 tokens)
        assert cluster.metric(w, "trtc:prefix_cache_hits_total") - hits[w] >= 6 * 80


def test_clients_that_leave_free_every_request_and_block(cluster):
    async def leave(c: openai.AsyncOpenAI, prompt: str) -> int:
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=400, stream=True)
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break
        await stream.close()
        return got

    async def main():
        async with client(cluster.rr_url) as c:
            return await asyncio.gather(*[leave(c, PROMPTS[i % 4] + f" {i}") for i in range(8)])

    assert run(main()) == [3] * 8
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        busy = {w: (cluster.metric(w, "trtc:num_requests_running"), cluster.metric(w, "trtc:kv_cache_usage_perc"))
                for w in cluster.workers}
        if all(v == (0.0, 0.0) for v in busy.values()):
            break
        time.sleep(0.2)
    assert all(v == (0.0, 0.0) for v in busy.values()), busy
    assert sum(cluster.metric(w, "trtc:request_success_total", finished_reason="abort") for w in cluster.workers) >= 8


def test_two_hundred_concurrent_streams_without_an_error(cluster):
    async def main():
        async with client(cluster.kv_url) as c:
            return await asyncio.gather(*[stream_text(c, PROMPTS[i % 4], 8 + i % 9) for i in range(200)],
                                        return_exceptions=True)

    results = run(main(), 300)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r for r in results)


def test_a_killed_worker_loses_no_stream_and_a_restarted_one_rejoins(tmp_path):
    c = Cluster(tmp_path, stories260k())
    try:
        c.worker("w0")
        c.worker("w1")
        url = c.frontend("--router-mode", "round-robin", "--migration-limit", "3")
        c.wait_ready(url, 2)

        async def streams(n: int, kill_after: float | None = None):
            async with client(url) as cl:
                tasks = [asyncio.create_task(stream_text(cl, PROMPTS[i % 4] + f" {i}", 48)) for i in range(n)]
                if kill_after is not None:
                    await asyncio.sleep(kill_after)
                    c.processes[1].stop(signal.SIGKILL)  # w1, mid-stream
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = run(streams(50, kill_after=1.0), 240)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors[:3]
        assert c.processes[1].proc.returncode == -signal.SIGKILL
        # New requests avoid the dead worker once its instance leaves discovery (its lease lapses, ~10 s with
        # file discovery); until then the frontend may still pick it for a new request.
        deadline = time.monotonic() + 60
        while len(c.instances()) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(c.instances()) == 1, c.instances()

        before = c.served("w0")
        results = run(streams(20), 240)
        assert not [r for r in results if isinstance(r, BaseException)]
        assert c.served("w0") - before == 20

        c.worker("w1")  # the restarted worker (a new instance, a new metrics port)
        c.wait_ready(url, 2)
        time.sleep(2.0)
        run(streams(10), 240)
        assert c.served("w1") >= 3, c.served("w1")
    finally:
        c.stop()

"""A failed step (out of memory, say) fails its own requests and the engine goes on; a broken device
stops it. In process: the runner's forward raises once (LLM.generate, generate_async); a real `trtc
serve` with TRTC_FAULT_INJECT_STEP: the failed request gets a 500 with an OpenAI error object, the
next one is served; with K:device, /health turns 503 and the process exits 1."""

from __future__ import annotations

import asyncio
import time

import httpx2 as httpx
import pytest
import torch
from serve_helpers import Server, stories260k

from trtc import SamplingParams
from trtc.llm import LLM
from trtc.runtime.executor import device_broken

PROMPTS = ["Once upon a time", "The dog", "Lily saw a big", "One day, Tom"]


def fail_once(llm: LLM, monkeypatch, error: Exception, at_call: int = 3) -> None:
    """The runner's forward raises `error` at its at_call-th call (the earlier ones and later ones run)."""
    forward, calls = llm.executor.runner.forward, [0]

    def flaky(*args, **kw):
        calls[0] += 1
        if calls[0] == at_call:
            raise error
        return forward(*args, **kw)

    monkeypatch.setattr(llm.executor.runner, "forward", flaky)


@pytest.fixture(scope="module")
def want():
    with LLM(stories260k(), device="cpu") as llm:
        return [o.text for o in llm.generate(PROMPTS, SamplingParams(max_tokens=12))]


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(want, monkeypatch):
    with LLM(stories260k(), device="cpu") as llm:
        fail_once(llm, monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12))
        assert [o.finish_reason for o in outs] == ["error"] * 4  # all four ran in the failed step
        assert all("OutOfMemoryError" in o.error and "retry" in o.error for o in outs)
        stats = llm.executor.scheduler.stats()
        assert stats["used_blocks"] == 0 and not llm.executor.has_unfinished() and not llm.executor.requests
        again = llm.generate(PROMPTS, SamplingParams(max_tokens=12))  # the engine goes on, outputs unchanged
    assert [o.text for o in again] == want and all(o.error is None for o in again)


def test_generate_async_fails_the_step_only(want, monkeypatch):
    with LLM(stories260k(), device="cpu") as llm:
        async def main():
            first = await llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=12))  # forward calls 1..12
            fail_once(llm, monkeypatch, RuntimeError("shape mismatch"), at_call=1)
            failed = await llm.generate_async(PROMPTS[1], SamplingParams(max_tokens=12))
            rest = await asyncio.gather(*[llm.generate_async(p, SamplingParams(max_tokens=12)) for p in PROMPTS])
            return first, failed, rest

        first, failed, rest = asyncio.run(main())
        assert llm.async_engine.alive and llm.async_engine.stats.used_blocks == 0
    assert first.text == want[0]
    assert failed.finish_reason == "error" and "RuntimeError: shape mismatch" in failed.error
    assert [o.text for o in rest] == want


def test_a_broken_device_stops_the_engine(monkeypatch):
    assert device_broken(RuntimeError("CUDA error: device-side assert triggered"))
    assert not device_broken(torch.OutOfMemoryError("CUDA out of memory"))
    with LLM(stories260k(), device="cpu") as llm:
        fail_once(llm, monkeypatch, RuntimeError("CUDA error: an illegal memory access was encountered"), at_call=1)

        async def main():
            return await asyncio.gather(llm.generate_async(PROMPTS[0], SamplingParams(max_tokens=4)),
                                        return_exceptions=True)

        (out,) = asyncio.run(main())
        assert "illegal memory access" in str(out) and "restart" in str(out)
        assert not llm.async_engine.alive and llm.async_engine.stats.engine_dead


def test_server_answers_500_for_the_failed_step_and_serves_the_next():
    server = Server(stories260k(), env={"TRTC_FAULT_INJECT_STEP": "3"})
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 8}
        ok = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=60)  # steps 1, 2
        assert ok.status_code == 200
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)  # step 3 fails
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "InternalServerError" and err["code"] == 500 and "step" in err["message"]
        again = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] == "length"
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        assert server.metric("trtc:engine_dead") == 0
    finally:
        assert server.stop() == 0


def test_server_streams_an_error_chunk_for_the_failed_step():
    server = Server(stories260k(), env={"TRTC_FAULT_INJECT_STEP": "2"})
    try:
        body = {"prompt": "Once upon a time", "max_tokens": 8, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200
        assert '"finish_reason": "error"' in lines[-3] and '"InternalServerError"' in lines[-2]
        assert lines[-1] == "data: [DONE]"
        again = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
        assert again.status_code == 200
    finally:
        assert server.stop() == 0


def test_server_with_a_broken_device_answers_503_and_exits_1():
    server = Server(stories260k(), env={"TRTC_FAULT_INJECT_STEP": "1:device"})
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=60)
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
        health = httpx.get(server.url + "/health", timeout=10)
        assert health.status_code == 503
        assert server.metric("trtc:engine_dead") == 1
        deadline = time.monotonic() + 60
        while server.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.proc.returncode == 1, server.output()
        assert "illegal memory access" in server.output()
    finally:
        server.stop()

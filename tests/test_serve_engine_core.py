"""`trtc serve` runs the engine in an engine core process of its own (trtc/runtime/engine_core.py):
a tp 2 engine served that way gives the offline tp 1 engine's tokens; SIGTERM ends both processes
(exit 0); a front killed with SIGKILL takes its core with it (no orphan holding the device)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx2 as httpx
from serve_helpers import Server, stories260k

from trtc import SamplingParams
from trtc.llm import LLM, load_tokenizer


def core_pids(front: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=,ppid=,args=", "-e"], capture_output=True, text=True).stdout
    return [int(p) for p, pp, *args in (line.split(None, 2) for line in out.splitlines())
            if int(pp) == front and "trtc.runtime.engine_core" in " ".join(args)]


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.2)
    return False


def test_tp2_server_gives_the_offline_tokens(tp_engines):
    prompts = [[3 + (5 * i + j) % 120 for j in range(4 + i)] for i in range(6)]
    with LLM(tp_engines[1][1], device="cpu") as tp1:
        want = [o.token_ids for o in tp1.generate(prompts, SamplingParams(max_tokens=12, end_id=-1))]
    server = Server(tp_engines[1][2])
    try:
        r = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "prompt": prompts, "max_tokens": 12, "ignore_eos": True, "logprobs": 0})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert len(choices) == 6 and all(c["finish_reason"] == "length" for c in choices)
        tokenizer = load_tokenizer(tp_engines[1][2])  # the token strings of the offline ids
        assert [c["logprobs"]["tokens"] for c in choices] == [[tokenizer.decode([t]) for t in ids] for ids in want]
    finally:
        assert server.stop() == 0, server.output()


def test_sigterm_ends_front_and_core_and_sigkill_takes_the_core_along():
    server = Server(stories260k())
    (core,) = core_pids(server.proc.pid)
    assert server.stop() == 0 and gone(core, 30), server.output()
    server = Server(stories260k())
    (core,) = core_pids(server.proc.pid)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Once", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(30)
    assert gone(core, 30), "the engine core outlived its front"

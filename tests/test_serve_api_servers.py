"""`trtc serve --api_server_count 3`: three HTTP front processes on one port over one engine core.
Streams through them give the offline engine's text, /metrics from any of them counts every
request, `trtc bench --url` with several client processes completes every request, SIGTERM ends
every process (exit 0), a front that dies stops the whole server (exit 1, no process left), and a
port in use is a one-line error before the engine loads."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import httpx2 as httpx
import openai
import pytest
from serve_helpers import REPO, Server, stories260k
from test_serve_engine_core import gone

from trtc import SamplingParams
from trtc.llm import LLM

PROMPTS = ["Once upon a time", "The dog", "Lily saw a big", "One day, Tom"]


def children(pid: int) -> list[int]:
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def cmdline(pid: int) -> str:
    return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")


@pytest.fixture
def server():
    s = Server(stories260k(), "--api_server_count", "3")
    yield s
    s.stop()


def test_streams_through_three_fronts_equal_offline_and_metrics_count_them_all(server):
    kids = children(server.proc.pid)
    assert sum("trtc.runtime.engine_core" in cmdline(k) for k in kids) == 1, [cmdline(k) for k in kids]
    assert sum("spawn_main" in cmdline(k) for k in kids) == 2  # the two other fronts
    prompts = [PROMPTS[i % 4] for i in range(24)]
    lengths = [6 + i % 7 for i in range(24)]
    with LLM(stories260k(), device="cpu") as offline:
        want = [o.text for o in offline.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])]

    async def one(prompt: str, n: int) -> str:
        # a client (a connection) per request: the kernel hands the connections to the three fronts
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0) as c:
            stream = await c.completions.create(model="test-model", prompt=prompt, max_tokens=n, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

    async def main():
        return await asyncio.wait_for(asyncio.gather(*[one(p, n) for p, n in zip(prompts, lengths)]), 120)

    assert asyncio.run(main()) == want
    for _ in range(4):  # whichever front answers the scrape, it sums all three
        with httpx.Client() as fresh:  # a new connection each time
            assert server.metric("trtc:request_success_total", finished_reason="length") == 24
            assert server.metric("trtc:generation_tokens_total") == sum(lengths)
            steps = server.metric("trtc:engine_steps_total")
            assert max(lengths) <= steps <= sum(lengths) + len(lengths)  # the core's, seen by every front
            assert server.metric("trtc:engine_graph_steps_total") == 0  # no CUDA graphs on the CPU
            assert fresh.get(server.url + "/health").status_code == 200


def test_bench_url_with_client_processes_completes_every_request(server, tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "trtc.cli", "bench", "--url", server.url, "--isl", "8", "--osl", "12",
                        "--num_requests", "30", "--concurrency", "10", "--client_processes", "2",
                        "--output_json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads(out.read_text())
    assert (result["completed"], result["errors"], result["client_processes"]) == (30, 0, 2)
    assert result["output_tokens_per_s"] * result["seconds"] == pytest.approx(30 * 12)
    assert server.metric("trtc:generation_tokens_total") == 30 * 12


def test_sigterm_ends_every_process_and_a_dead_front_stops_the_server(server):
    kids = children(server.proc.pid)
    assert len(kids) >= 3
    assert server.stop() == 0, server.output()
    assert all(gone(k, 30) for k in kids), server.output()

    s = Server(stories260k(), "--api_server_count", "2")
    kids = children(s.proc.pid)
    front = next(k for k in kids if "spawn_main" in cmdline(k))
    subprocess.run(["kill", "-KILL", str(front)], check=True)
    assert s.proc.wait(60) == 1
    assert "API server 1 exited with status -9" in s.output(), s.output()
    assert "Traceback" not in s.output()
    assert all(gone(k, 30) for k in kids), s.output()
    assert s.proc.returncode != -signal.SIGKILL


def test_a_port_in_use_is_one_line_before_the_engine_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "trtc.cli", "serve", str(stories260k()), "--device", "cpu",
                            "--port", str(taken.getsockname()[1]), "--api_server_count", "2"], cwd=REPO,
                           capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "could not listen on 127.0.0.1" in r.stderr and "--port" in r.stderr
    assert "loaded" not in r.stderr  # the engine was never loaded


def test_a_killed_core_stops_every_front():
    s = Server(stories260k(), "--api_server_count", "2")
    kids = children(s.proc.pid)
    core = next(k for k in kids if "trtc.runtime.engine_core" in cmdline(k))
    subprocess.run(["kill", "-KILL", str(core)], check=True)
    assert s.proc.wait(60) == 1, s.output()
    assert "the engine core process exited" in s.output() and "Traceback" not in s.output(), s.output()
    assert all(gone(k, 30) for k in kids), s.output()

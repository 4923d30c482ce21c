"""The README's five-minute tour, run as written: its shell block (convert, build, run, a server in the
background) and its Python blocks (the openai client against that server, the LLM API), read from
README.md itself, with only the work folder and the port replaced (a temporary folder, a free port)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time

import httpx2 as httpx
from serve_helpers import REPO, free_port, stop_process, stories260k

GREEDY = ", there was a little girl named Lily. She loved to play outside in the park."  # after "Once upon a time"


def tour_blocks() -> tuple[list[str], list[str]]:
    """The tour's shell lines and its Python blocks."""
    readme = (REPO / "README.md").read_text()
    tour = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    shell = re.findall(r"```bash\n(.*?)```", tour, re.S)
    python = re.findall(r"```python\n(.*?)```", tour, re.S)
    assert len(shell) == 1 and len(python) == 2, "the tour has one shell block and two Python blocks"
    return [line for line in shell[0].splitlines() if line.strip()], python


def test_readme_tour_runs_as_written(tmp_path):
    stories260k()  # skips where the fixtures are absent
    shell, python = tour_blocks()
    port = free_port()
    here = {"/tmp/stories": str(tmp_path), "--port 8000": f"--port {port}", "127.0.0.1:8000": f"127.0.0.1:{port}"}

    def local(text: str) -> str:
        for a, b in here.items():
            text = text.replace(a, b)
        return text

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = None
    try:
        for line in shell:
            background = line.rstrip().endswith("&")
            args = shlex.split(local(line.rstrip().rstrip("&")))
            assert args[0] == "trtc", line
            cmd = [sys.executable, "-m", "trtc.cli", *args[1:]]
            if background:
                server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                continue
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"{line}\n{r.stdout}\n{r.stderr}"
            if args[1] == "run":
                assert GREEDY in r.stdout, r.stdout
        assert server is not None, "the tour starts a server"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, "trtc serve exited"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for block in python:
            r = subprocess.run([sys.executable, "-c", local(block)], cwd=REPO, env=env, capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, f"{block}\n{r.stderr}"
            assert GREEDY in r.stdout, r.stdout
    finally:
        if server is not None:
            stop_process(server)

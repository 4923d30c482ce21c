"""Real NVIDIA Dynamo processes on loopback for the scale-out tests: a frontend (`python -m dynamo.frontend`)
and trtc workers (`python -m trtc.dynamo`), found through Dynamo's file discovery (a DYN_FILE_KV folder
shared by one test's processes), each worker with its own metrics port (DYN_SYSTEM_PORT)."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from serve_helpers import CHAT_TEMPLATE, REPO, free_port, stop_process, wait_ready

pytest.importorskip("dynamo.common.backend", reason="NVIDIA Dynamo is not installed (scripts/install_dynamo.sh)")

MODEL = "test-model"


def free_system_port() -> int:
    """A free loopback port below 32768: Dynamo reads DYN_SYSTEM_PORT as a signed 16-bit number."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32768")


class Process:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = open(log_dir / f"{name}.log", "w+")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        return stop_process(self.proc, sig, timeout)


class Cluster:
    """Dynamo processes of one test. `root`: its folder (discovery, logs, the chat template)."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self.template = root / "chat_template.jinja"
        self.template.write_text(CHAT_TEMPLATE)
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "DYN_FILE_KV": str(root / "discovery"),
                    "DYN_LOG": "warn", "OMP_NUM_THREADS": "1"}
        self.processes: list[Process] = []
        self.workers: dict[str, int] = {}  # worker name -> its metrics port

    def frontend(self, *flags: str) -> str:
        """Starts a frontend; returns its base URL once it answers."""
        port = free_port()
        p = Process(f"frontend-{port}", [sys.executable, "-m", "dynamo.frontend", "--discovery-backend", "file",
                                         "--http-host", "127.0.0.1", "--http-port", str(port), *flags],
                    self.env, self.root)
        self.processes.append(p)
        url = f"http://127.0.0.1:{port}"
        self._wait(p, lambda: httpx.get(url + "/v1/models", timeout=1).status_code == 200, 60)
        return url

    def worker(self, name: str, *flags: str) -> Process:
        """Starts a trtc worker; returns once its metrics port answers (the engine is loaded)."""
        port = free_system_port()
        p = Process(name, [sys.executable, "-m", "trtc.dynamo", "--model", str(self.model), "--device", "cpu",
                           "--served-model-name", MODEL, "--discovery-backend", "file",
                           "--custom-jinja-template", str(self.template), *flags],
                    {**self.env, "DYN_SYSTEM_PORT": str(port)}, self.root)
        self.processes.append(p)
        self.workers[name] = port
        self._wait(p, lambda: "trtc:num_requests_running" in httpx.get(f"http://127.0.0.1:{port}/metrics",
                                                                        timeout=1).text, 180)
        return p

    def wait_ready(self, url: str, num_workers: int, timeout: float = 60) -> None:
        """Until the frontend at `url` serves the model and `num_workers` workers are registered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Once", "max_tokens": 1},
                               timeout=10)
                if r.status_code == 200 and len(self.instances()) >= num_workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the frontend at {url} did not see {num_workers} workers in {timeout} s:\n"
                           + "\n".join(p.output() for p in self.processes))

    def instances(self) -> list[str]:
        """Worker instances registered in discovery (files under DYN_FILE_KV)."""
        base = self.root / "discovery" / "v1" / "instances"
        return [p.name for p in base.glob("*") if "generate" in p.name] if base.is_dir() else []

    def metric(self, worker: str, name: str, **labels: str) -> float:
        """A trtc metric of one worker, summed over its label sets that have `labels`, from its /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.workers[worker]}/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            m = re.match(rf"^{re.escape(name)}(\{{.*\}})?\s+(\S+)$", line)
            if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def served(self, worker: str) -> float:
        return self.metric(worker, "trtc:request_success_total")

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.stop()

    def _wait(self, p: Process, ready, timeout: float) -> None:
        wait_ready(p.proc, ready, timeout, p.name, p.output, pause=0.3)

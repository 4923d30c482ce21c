"""A real `trtc serve` process on a free loopback port, for the server tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (  # a small template: stories260K's tokenizer has none
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def stories260k() -> Path:
    path = FIXTURES / "stories260K"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    """Send `sig`, wait up to `timeout` s, then kill; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_ready(proc: subprocess.Popen, ready, timeout: float, name: str, output, pause: float = 0.2) -> None:
    """Until ready() (HTTP errors count as not yet); RuntimeError with the process's output if it exits
    first or `timeout` s pass (then it is stopped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output()}")
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(pause)
    stop_process(proc)
    raise RuntimeError(f"{name} did not start in {timeout} s:\n{output()}")


class Server:
    def __init__(self, model: Path, *flags: str, env: dict | None = None, startup_s: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"trtc-serve-{self.port}.log", "w+")
        cmd = [sys.executable, "-m", "trtc.cli", "serve", str(model), "--port", str(self.port), "--device", "cpu",
               "--served_model_name", "test-model", *flags]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
        wait_ready(self.proc, lambda: httpx.get(self.url + "/health", timeout=1).status_code == 200, startup_s,
                   "server", self.output)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout: float = 30) -> int:
        return stop_process(self.proc, signal.SIGTERM, timeout)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples by name with labels, e.g. 'trtc:num_requests_running{model_name="x"}'."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(\S+)\s+(\S+)$", line)
            if m and not line.startswith("#"):
                out[m.group(1)] = float(m.group(2))
        return out

    def metric(self, name: str, **labels) -> float:
        label = ",".join(f'{k}="{v}"' for k, v in sorted({"model_name": "test-model", **labels}.items()))
        return self.metrics().get(f"{name}{{{label}}}", 0.0)


def hermes_engine(root: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer and a Hermes-style chat template (tools rendered
    by it), built for the server's structured-output and tool-calling tests."""
    from models import add_byte_tokenizer, make_hf_model

    from trtc.compiler.build import build_from_hf
    from trtc.formats.build_config import BuildConfig

    hf = add_byte_tokenizer(make_hf_model(root / "hf", "llama3_gqa", vocab_size=400, num_hidden_layers=1,
                                          max_position_embeddings=1024), chat_template="hermes")
    return build_from_hf(hf, root / "engine", dtype="float32", build_config=BuildConfig(
        max_batch_size=16, max_num_tokens=1024, tokens_per_block=16, max_seq_len=1024), progress=False)

"""Run a kernel test file's `__main__` cases under Triton's CPU interpreter (TRITON_INTERPRET=1),
in a subprocess, since the interpreter is chosen when Triton is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_under_interpreter(path: str) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

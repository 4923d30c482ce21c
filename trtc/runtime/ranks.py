"""Rank 0's side of a tensor-parallel run: starting the ranks, sending them steps, failing clearly.

`start_ranks` brings up the ranks of an engine of world size > 1 and returns rank 0's `Ranks`:

* Without a launcher, this process is rank 0 and starts ranks 1..N-1 itself as processes of
  `python -m trtc.runtime.worker` on this machine, meeting them through a TCPStore on 127.0.0.1
  (a free port). GPUs: rank r on cuda:r, NCCL; CPU: gloo.
* Under torchrun or mpirun (trtc/runtime/parallel/launch.py) every process runs the user's program. Rank 0
  returns from here as usual; any other rank serves rank 0's steps here and then ends its process
  (SystemExit): nothing after `LLM(...)` / `Executor(...)` runs on it.

Failures end the run with one line instead of a hang. A watchdog thread polls the processes rank
0 started: one that exits fails the step in progress, or the next one, with "rank 1 exited with
code -9 (SIGKILL); the run is stopped". A collective that fails or waits longer than
TRTC_COLLECTIVE_TIMEOUT seconds does the same. On GPUs a collective waiting for a dead rank does
not return by itself: the watchdog aborts the NCCL communicator so that it does, and if the step
is still stuck GRACE_S later, prints the line and ends the process; it does the same with a step
that lasts longer than the collective timeout (a stuck rank, which NCCL's own watchdog would
notice later and end the process with a longer story). After a failure the other ranks are
stopped and the executor refuses further steps. NCCL's abort can itself hang: it runs once, in a
thread, and is waited for GRACE_S at most; if it has not returned, the failure is still raised,
and the process ends at exit without the interpreter's teardown (which would wait on NCCL).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from trtc.errors import TrtcError
from trtc.runtime.parallel.distributed import (
    START_TIMEOUT_S,
    TIMEOUT_ENV,
    RankGroup,
    collective_timeout,
    error_line,
)
from trtc.runtime.parallel.launch import check_world, external_launch
from trtc.runtime.parallel.step import Step, send_step
from trtc.runtime.worker import READY_KEY, RankOptions, run_rank

POLL_S = 0.2  # how often the watchdog looks at the other ranks' processes
GRACE_S = 10.0  # a step still stuck this long after a rank died ends the process


def _exit_now(code: int) -> None:
    """End the process at exit without the interpreter's teardown (which would wait on NCCL)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_ranks(engine, device: torch.device, options: RankOptions) -> tuple[Ranks | None, torch.device]:
    """The ranks of `engine` (None for one rank) and rank 0's device."""
    launch = external_launch()
    check_world(engine, launch, device.type, torch.cuda.device_count() if device.type == "cuda" else 0)
    world = engine.mapping.world_size
    if launch is None and world == 1:
        return None, device
    if launch is not None:
        device = launch.device(device.type)
        group = RankGroup.join(launch.rank, launch.world_size, device)
        if launch.rank != 0:  # serve rank 0, then end the process: the program's own work is rank 0's
            raise SystemExit(run_rank(engine, device, group, options))
        return Ranks(group, None), device
    if dist.is_initialized():
        raise TrtcError("this process runs a tensor-parallel engine already (or has a torch.distributed group); "
                        "close it first (LLM.close())")
    device = torch.device("cuda", 0) if device.type == "cuda" else device
    processes = RankProcesses(engine.directory, world, device.type, options)
    try:
        processes.wait_ready(START_TIMEOUT_S)
        group = RankGroup.join(0, world, device, processes.store)
    except TrtcError as e:  # a rank that died while the ranks met says more than the meeting's error
        dead = processes.first_exit()
        processes.stop(timeout=0)
        raise TrtcError(dead or str(e)) from None
    except BaseException:
        processes.stop(timeout=0)
        raise
    return Ranks(group, processes), device




def cpu_share(world_size: int) -> int:
    """Threads of one rank when all ranks run on this machine's CPU cores."""
    return max(1, (os.cpu_count() or 1) // world_size)


def exit_message(rank: int, code: int) -> str:
    if code < 0:
        try:
            how = f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            how = f"code {code}"
    else:
        how = f"code {code}" + (" (its error is above)" if code else "")
    return f"rank {rank} exited with {how}; the run is stopped"


class RankProcesses:
    """Ranks 1..N-1 as child processes of rank 0."""

    def __init__(self, engine_dir: Path, world_size: int, device_type: str, options: RankOptions) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                                   timeout=timedelta(seconds=START_TIMEOUT_S))
        cmd = [sys.executable, "-m", "trtc.runtime.worker", "--engine_dir", str(engine_dir), "--world_size",
               str(world_size), "--store", f"127.0.0.1:{self.store.port}", "--device", device_type, *options.to_args()]
        self.procs = {r: subprocess.Popen([*cmd, "--rank", str(r)]) for r in range(1, world_size)}

    def wait_ready(self, timeout: float) -> None:
        """Until every rank has connected; a rank that exits first is an error."""
        keys, deadline = [READY_KEY.format(rank=r) for r in self.procs], time.monotonic() + timeout
        while not self.store.check(keys):
            if (message := self.first_exit()) is not None:
                raise TrtcError(message.replace("the run is stopped", "it did not start"))
            if time.monotonic() > deadline:
                raise TrtcError(f"the other ranks did not start within {timeout:g} s")
            time.sleep(0.02)

    def first_exit(self) -> str | None:
        for rank, proc in self.procs.items():
            if (code := proc.poll()) is not None:
                return exit_message(rank, code)
        return None

    def stop(self, timeout: float) -> None:
        """Wait up to `timeout` s for the processes to end (after a stop step), then end them."""
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Ranks:
    """Rank 0's handle on the other ranks."""

    def __init__(self, group: RankGroup, processes: RankProcesses | None) -> None:
        self.group, self.processes = group, processes
        self._threads = torch.get_num_threads()
        if group.device.type == "cpu" and processes is not None:  # the ranks share this machine's cores
            torch.set_num_threads(cpu_share(group.world_size))
        self.failure: str | None = None
        self.busy: str | None = None  # the guarded section rank 0 is in: "step", "start-up"
        self._busy_since = 0.0
        self._closed = threading.Event()
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="trtc-ranks-watchdog", daemon=True).start()

    def send(self, step: Step) -> None:
        send_step(self.group, step)

    @contextmanager
    def guard(self, section: str = "step"):
        """A section during which the ranks work together. A rank that fails before or inside
        it, or a collective that fails, stops the ranks and raises one TrtcError; rank 0's own
        error stops them too and goes on as it is."""
        if self.failure is not None:
            self._fail(self.failure)
            raise TrtcError(self.failure)
        self.busy, self._busy_since = section, time.monotonic()
        try:
            yield
        except BaseException as e:
            message = self._explain(e)
            self._fail(message or f"rank 0 failed ({type(e).__name__}); the tensor-parallel ranks are stopped")
            if message is None or not isinstance(e, Exception):
                raise
            raise TrtcError(self.failure) from None
        finally:
            self.busy = None
        if self.failure is not None:  # a rank died and the watchdog aborted this step's collectives
            self._fail(self.failure)
            raise TrtcError(self.failure)

    def close(self) -> None:
        """Stop the other ranks (a stop step; they end) and leave the groups."""
        if self._closed.is_set():
            return
        if self.failure is not None:
            self._fail(self.failure)
            return
        self._closed.set()
        atexit.unregister(self.close)
        try:
            send_step(self.group, None)
        except RuntimeError:
            pass  # a rank is gone already
        self.group.close()  # with the other ranks: NCCL's orderly destroy waits for all of them
        if self.processes is not None:
            self.processes.stop(timeout=30)
        torch.set_num_threads(self._threads)

    # Failures -------------------------------------------------------------------------------------
    def _fail(self, message: str) -> None:
        """Record the first failure; end the other ranks and leave the groups without waiting."""
        if self.failure is None:
            self.failure = message
        if not self._closed.is_set():
            self._closed.set()
            atexit.unregister(self.close)
            if self.processes is not None:
                self.processes.stop(timeout=0)
            if self.group.device.type == "cuda":
                self._abort()  # once: the watchdog's, if it began one already
                if not self.group.aborted.wait(GRACE_S):  # NCCL's abort hangs: this process cannot end normally
                    atexit.register(_exit_now, 1)
            else:
                self.group.close(abort=True)
            torch.set_num_threads(self._threads)

    def _explain(self, error: BaseException) -> str | None:
        """The one line a failure inside a guarded section ends the run with; None for an error
        of rank 0's own (it goes on as it is)."""
        if self.failure is not None:
            return self.failure
        if isinstance(error, TrtcError):
            return str(error)
        if not isinstance(error, Exception):
            return "a step was interrupted; the tensor-parallel ranks are stopped, load the engine again"
        if self.processes is not None:  # a dead rank: its socket may close a moment before it is reaped
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if (message := self.processes.first_exit()) is not None:
                    return message
                time.sleep(0.02)
        text = str(error)
        if not any(word in text for word in ("gloo", "NCCL", "nccl", "c10d", "Connection closed", "Timed out")):
            return None
        first = error_line(error)
        if "timed out" in text.lower() or "timeout" in text.lower():
            return (f"a collective waited more than {collective_timeout():g} s for the other ranks ({TIMEOUT_ENV}): "
                    f"a rank hangs or died ({first}); the run is stopped")
        return f"a collective failed ({first}); the run is stopped"

    def _abort(self) -> None:
        """Abort the NCCL communicators from a thread of its own: an abort can itself hang, and
        neither the watchdog nor a failing step may wait for it longer than GRACE_S."""
        threading.Thread(target=self.group.abort, name="trtc-nccl-abort", daemon=True).start()

    def _watch(self) -> None:
        failed_at, timeout = None, collective_timeout()
        while not self._closed.wait(POLL_S):
            now = time.monotonic()
            if self.failure is None and self.processes is not None:
                if (message := self.processes.first_exit()) is not None:
                    self.failure, failed_at = message, now
                    if self.busy and self.group.device.type == "cuda":
                        self._abort()
            if self.failure is None and self.busy == "step" and now - self._busy_since > timeout:
                self.failure, failed_at = (f"a step waited more than {timeout:g} s for the other ranks ({TIMEOUT_ENV}): "
                                           "a rank hangs; the run is stopped"), now
                if self.group.device.type == "cuda":
                    self._abort()
            if self.failure is not None and self.busy and now - failed_at > GRACE_S:
                print(f"Error: {self.failure}", file=sys.stderr, flush=True)
                if self.processes is not None:
                    for proc in self.processes.procs.values():
                        proc.kill()  # a stopped or stuck rank too
                os._exit(1)

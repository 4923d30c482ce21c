"""The process groups joining the tensor-parallel ranks, and the collectives the runtime uses.

* The data plane (NCCL on GPUs, gloo on CPU) carries the all-reduces after the row-parallel
  layers and the all-gather of the vocab-parallel LM head, inside the forward (and so inside the
  decode CUDA graphs). Its collectives time out after TRTC_COLLECTIVE_TIMEOUT seconds (300 by
  default): a rank that hangs stops the run instead of hanging it. (NCCL's own timeout, whose
  watchdog ends the process, is NCCL_BACKSTOP_S longer: rank 0's watchdog, trtc/runtime/ranks.py,
  ends the run first and with a clearer line.)
* The control plane (gloo, CPU tensors) carries rank 0's step messages (trtc/runtime/parallel/step.py). On
  the ranks other than 0 its waits have no practical timeout, since the runtime may sit idle
  between requests as long as its user likes (a rank 0 that dies closes its sockets, which they
  notice at once); on rank 0 it has the data plane's timeout, since a gloo send waits until the
  receiver has posted its receive, which a stuck rank never does.
* The start-up group (gloo) carries the start-up exchange, which waits for every rank to have
  loaded its weights: START_TIMEOUT_S, however short the collective timeout.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from trtc.errors import TrtcError

TIMEOUT_ENV = "TRTC_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
IDLE_TIMEOUT = timedelta(days=365)
NCCL_BACKSTOP_S = 30.0
START_TIMEOUT_S = 1800.0  # starting a rank's process and loading its weights (rank 0 watches the processes it started)
# torch >= 2.13 names it all_gather_single; earlier versions all_gather_into_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def collective_timeout() -> float:
    """Seconds a collective of the data plane may wait for the other ranks."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise TrtcError(f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; unset it or give e.g. 300")
    return seconds


class RankGroup:
    """One rank's handle on all of them: `rank`, `world_size`, the data-plane collectives, the
    control plane and the start-up exchange."""

    def __init__(self, rank: int, world_size: int, device: torch.device, control, startup, owns_default_group: bool) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.control, self.startup = control, startup
        self._owns = owns_default_group
        self._abort_lock, self._aborting = threading.Lock(), False
        self.aborted = threading.Event()  # set when `abort` has returned

    @classmethod
    def join(cls, rank: int, world_size: int, device: torch.device, store: dist.Store | None = None) -> RankGroup:
        """Join the ranks: through `store` (rank 0 started the others), or through MASTER_ADDR and
        MASTER_PORT (an external launcher). A process group the program made already is reused."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=collective_timeout())
        owns = not dist.is_initialized()
        try:
            if owns:
                kwargs: dict = {"store": store} if store is not None else {"init_method": "env://"}
                if store is None:  # mpirun does not set them; right for one node
                    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
                    os.environ.setdefault("MASTER_PORT", "29500")
                data_timeout = timeout
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                    kwargs["device_id"] = device  # NCCL is up before any CUDA graph is captured
                    data_timeout += timedelta(seconds=NCCL_BACKSTOP_S)
                dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=data_timeout, **kwargs)
            elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise TrtcError(
                    f"this program's torch.distributed group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                    f"the engine needs rank {rank} of {world_size}; start as many processes as the engine has ranks"
                )
            control = dist.new_group(backend="gloo", timeout=timeout if rank == 0 else IDLE_TIMEOUT)
            startup = dist.new_group(backend="gloo", timeout=timedelta(seconds=START_TIMEOUT_S))
            group = cls(rank, world_size, device, control, startup, owns)
            group.all_reduce(torch.ones(1, device=device))  # the data plane works
        except (RuntimeError, ValueError) as e:  # DistNetworkError, DistStoreError, NCCL errors
            if owns and dist.is_initialized():
                dist.destroy_process_group()
            raise TrtcError(f"rank {rank} could not join the other {world_size - 1} rank(s) ({error_line(e)})") from None
        return group

    # Data plane: inside the forward ---------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        dist.all_reduce(x)
        return x

    def all_gather_vocab(self, x: torch.Tensor) -> torch.Tensor:
        """x: [S, local_vocab] of each rank -> [S, world_size * local_vocab], rank 0's columns first."""
        out = x.new_empty(self.world_size * x.shape[0], x.shape[1])
        _all_gather(out, x.contiguous())
        return out.view(self.world_size, x.shape[0], x.shape[1]).transpose(0, 1).reshape(x.shape[0], -1)

    # Control plane --------------------------------------------------------------------------------
    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's CPU tensor `t` into every rank's `t`."""
        dist.broadcast(t, 0, group=self.control)

    def exchange(self, value) -> list:
        """Every rank's `value` (a small picklable object), in rank order, on every rank."""
        out = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.startup)
        return out

    def abort(self) -> None:
        """NCCL: abort the communicators without waiting for the other ranks (the collectives in
        flight return at once, with garbage) and leave the groups; a group the program made itself
        has only its data plane aborted. For a rank that waits on a dead or stuck one. It runs
        once, whichever threads call it; `aborted` is set when it has returned (an abort can
        itself hang: callers wait for it with a time limit)."""
        with self._abort_lock:
            if self._aborting:
                return
            self._aborting = True
        try:
            if dist.is_initialized():
                abort_all = getattr(dist.distributed_c10d, "_abort_process_group", None)
                if self._owns and abort_all is not None:
                    abort_all()
                    self._owns = False
                else:
                    dist.group.WORLD.abort()
        finally:
            self.aborted.set()

    def close(self, abort: bool = False) -> None:
        """Leave the groups (a group the program made itself is left to it). abort: the other
        ranks may be dead or stuck (NCCL's orderly destroy would wait for them): on GPUs, `abort`."""
        if abort and self.device.type == "cuda":
            self.abort()
            return
        if self._owns and dist.is_initialized():
            dist.destroy_process_group()
        self._owns = False


def error_line(e: BaseException) -> str:
    """The first line of a collective's error, without the source path gloo puts in front."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(e).__name__

"""Who is which rank: a tensor-parallel engine runs one process per rank.

Without a launcher, the user's process (`trtc run`, `trtc bench`, `LLM(...)`) is rank 0 and
starts the other ranks itself (trtc/runtime/ranks.py). An external launcher instead starts every
rank, and each one runs the user's program; trtc reads who is who from its environment:

    torchrun --nproc_per_node N ...   RANK, WORLD_SIZE, LOCAL_RANK (+ MASTER_ADDR, MASTER_PORT)
    mpirun -np N ... (Open MPI)       OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK
    mpirun -np N ... (MPICH, Intel)   PMI_RANK, PMI_SIZE, MPI_LOCALRANKID

Under mpirun, MASTER_ADDR and MASTER_PORT (rank 0's host and a free port) default to 127.0.0.1
and 29500, which is right on one node; across nodes pass them (`mpirun -x MASTER_ADDR=...`).
Rank r uses GPU `cuda:LOCAL_RANK` (`cuda:r` when rank 0 starts the ranks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping as EnvMapping
from dataclasses import dataclass

import torch

from trtc.errors import TrtcError
from trtc.formats.mapping import valid_tp_sizes

LAUNCHERS = (  # name, rank, world size, local rank
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpirun", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


@dataclass(frozen=True)
class Launch:
    rank: int
    world_size: int
    local_rank: int
    launcher: str | None = None  # "torchrun" or "mpirun"; None when rank 0 starts the others itself

    def device(self, kind: str) -> torch.device:
        return torch.device("cuda", self.local_rank) if kind == "cuda" else torch.device("cpu")


def external_launch(env: EnvMapping[str, str] = os.environ) -> Launch | None:
    """The launch an external launcher describes in `env`, or None (none, or a world of one)."""
    for name, rank_key, size_key, local_key in LAUNCHERS:
        if rank_key in env and size_key in env:
            try:
                rank, size = int(env[rank_key]), int(env[size_key])
                local = int(env.get(local_key, rank))
            except ValueError:
                raise TrtcError(f"{rank_key}={env[rank_key]!r}, {size_key}={env[size_key]!r} set by {name} are not integers") from None
            return Launch(rank, size, local, name) if size > 1 else None
    return None


def check_world(engine, launch: Launch | None, device_type: str, gpus_found: int) -> None:
    """Refuse a launch that does not give the engine one process (and, on GPUs, one GPU) per rank."""
    world, tp = engine.mapping.world_size, engine.mapping.tp_size
    if launch is not None and launch.world_size != world:
        raise TrtcError(
            f"engine {engine.directory} was built for {world} rank(s) (tp {tp}) but {launch.launcher} started "
            f"{launch.world_size} processes; start {world}, or rebuild with --tp {launch.world_size}"
        )
    if device_type != "cuda":
        return  # on CPU every rank is a process (gloo)
    needed = world if launch is None else launch.local_rank + 1
    if gpus_found < needed:
        fits = valid_tp_sizes(engine.graph, max(gpus_found, 1))
        if launch is None:
            raise TrtcError(
                f"engine {engine.directory} needs {world} GPUs (tp {tp}), {gpus_found} found; run it on a machine "
                f"with {world} GPUs or rebuild with --tp {fits[-1]}"
            )
        raise TrtcError(
            f"rank {launch.rank} has local rank {launch.local_rank} but this node has {gpus_found} GPU(s); "
            f"start at most {gpus_found} processes per node"
        )

"""A tensor-parallel run that loses a rank, or gets bad input, ends with one line naming the problem
and the fix: never a hang, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import pytest
from cli_helpers import assert_one_line_error, cli

from trtc.errors import TrtcError
from trtc.formats.engine import Engine
from trtc.llm import LLM
from trtc.runtime.parallel.launch import Launch, check_world, external_launch
from trtc.runtime.sampling_params import SamplingParams

LONG = SamplingParams(max_tokens=80, end_id=-1)


def test_killed_rank_ends_the_run_with_one_line(tp_engines):
    llm = LLM(tp_engines[1][2], kv_cache_max_tokens=512)
    rank1 = llm.executor.ranks.processes.procs[1]
    threading.Timer(0.5, rank1.kill).start()  # while rank 0 is inside a step
    start = time.monotonic()
    with pytest.raises(TrtcError) as e:
        for _ in range(100):
            llm.generate([5, 6, 7], LONG)
    assert time.monotonic() - start < 15
    assert str(e.value) == "rank 1 exited with code -9 (SIGKILL); the run is stopped"
    with pytest.raises(TrtcError, match="rank 1 exited with code -9"):  # stopped for good
        llm.generate([5, 6, 7], LONG)
    llm.close()
    with LLM(tp_engines[1][2], kv_cache_max_tokens=512) as again:  # the process can run ranks again
        assert len(again.generate([5, 6, 7], SamplingParams(max_tokens=3, end_id=-1)).token_ids) == 3


def test_hung_rank_ends_the_run_after_the_collective_timeout(tp_engines, monkeypatch):
    monkeypatch.setenv("TRTC_COLLECTIVE_TIMEOUT", "2")
    llm = LLM(tp_engines[1][2], kv_cache_max_tokens=512)
    rank1 = llm.executor.ranks.processes.procs[1]
    os.kill(rank1.pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(TrtcError) as e:
        llm.generate([5, 6, 7], LONG)
    assert time.monotonic() - start < 10
    assert "waited more than 2 s for the other ranks (TRTC_COLLECTIVE_TIMEOUT)" in str(e.value)
    assert "\n" not in str(e.value) and rank1.poll() is not None  # the stuck rank is ended
    llm.close()


def test_one_tensor_parallel_engine_per_process(tp_engines):
    with LLM(tp_engines[1][2], kv_cache_max_tokens=512):
        with pytest.raises(TrtcError, match=r"runs a tensor-parallel engine already.*LLM.close\(\)"):
            LLM(tp_engines[1][2])


def test_rank_failing_at_start_up(tp_engines, tmp_path):
    engine = shutil.copytree(tp_engines[1][2], tmp_path / "engine")
    (engine / "rank1.engine").unlink()
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "w1"), "rank 1:", "rank1.engine is missing",
                          "rebuild")


def test_rank_file_of_another_build(tp_engines, other_tp2_engine, tmp_path):
    engine = shutil.copytree(tp_engines[1][2], tmp_path / "engine")
    shutil.copyfile(other_tp2_engine / "rank1.engine", engine / "rank1.engine")
    assert_one_line_error(cli("run", "--engine_dir", engine, "--input_text", "w1"), "rank 1:", "rank1.engine",
                          "comes from another build", "rebuild the engine directory")


def test_bad_collective_timeout(tp_engines, monkeypatch):
    monkeypatch.setenv("TRTC_COLLECTIVE_TIMEOUT", "soon")
    assert_one_line_error(cli("run", "--engine_dir", tp_engines[1][2], "--input_text", "w1"),
                          "TRTC_COLLECTIVE_TIMEOUT='soon'", "positive number of seconds")


def test_tp_not_dividing_the_heads(tp_engines, tmp_path):
    hf, _ = tp_engines
    assert_one_line_error(cli("build", "--model_dir", hf, "--output_dir", tmp_path / "e", "--tp", 3),
                          "--tp 3 does not divide the 4 attention heads", "valid --tp values for this model: 1, 2, 4")
    assert not (tmp_path / "e").exists()


def test_gpus_needed_and_found(tp_engines):
    engine = Engine.load(tp_engines[1][4])
    with pytest.raises(TrtcError) as e:
        check_world(engine, None, "cuda", 2)
    assert str(e.value) == (f"engine {engine.directory} needs 4 GPUs (tp 4), 2 found; run it on a machine with 4 GPUs "
                            "or rebuild with --tp 2")
    check_world(engine, None, "cuda", 8)
    check_world(engine, None, "cpu", 0)  # on CPU every rank is a process
    with pytest.raises(TrtcError, match="built for 4 rank.*torchrun started 2 processes; start 4, or rebuild with --tp 2"):
        check_world(engine, Launch(0, 2, 0, "torchrun"), "cuda", 2)
    with pytest.raises(TrtcError, match="local rank 2 but this node has 2 GPU.*at most 2 processes per node"):
        check_world(engine, Launch(2, 4, 2, "mpirun"), "cuda", 2)
    check_world(engine, Launch(3, 4, 1, "mpirun"), "cuda", 2)  # two nodes of two GPUs


def test_external_launchers_are_read_from_the_environment():
    assert external_launch({}) is None
    assert external_launch({"RANK": "0", "WORLD_SIZE": "1"}) is None  # a world of one: rank 0 starts any others
    assert external_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1, "torchrun")
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert external_launch(ompi) == Launch(1, 2, 1, "mpirun")
    assert external_launch({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0"}) == Launch(2, 4, 0, "mpirun")
    with pytest.raises(TrtcError, match="not integers"):
        external_launch({"RANK": "x", "WORLD_SIZE": "2"})


def test_a_hanging_nccl_abort_runs_once_and_is_waited_for_a_bounded_time(monkeypatch):
    """NCCL's abort can hang (seen with CUDA graphs that captured its collectives alive): the
    watchdog's abort and the failing step's share one call, the step waits GRACE_S at most and
    still fails, and the process is set to end at exit instead of waiting on NCCL's teardown."""
    import torch
    import torch.distributed as dist

    from trtc.runtime import ranks as ranks_module
    from trtc.runtime.parallel.distributed import RankGroup

    calls, release = [], threading.Event()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.distributed_c10d, "_abort_process_group", lambda: (calls.append(1), release.wait(30)))
    at_exit = []
    monkeypatch.setattr(ranks_module.atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    monkeypatch.setattr(ranks_module.atexit, "unregister", lambda fn: None)
    monkeypatch.setattr(ranks_module, "GRACE_S", 0.5)
    group = RankGroup(0, 2, torch.device("cuda"), None, None, owns_default_group=True)
    ranks = ranks_module.Ranks(group, None)
    try:
        ranks._abort()  # the watchdog's, on seeing a dead rank
        start = time.monotonic()
        with pytest.raises(TrtcError, match="rank 1 exited"):
            with ranks.guard():
                ranks.failure = "rank 1 exited with code -9 (SIGKILL); the run is stopped"
        assert 0.4 < time.monotonic() - start < 5
        assert len(calls) == 1 and not group.aborted.is_set()
        assert (ranks_module._exit_now, (1,)) in at_exit
    finally:
        release.set()
    assert group.aborted.wait(5)

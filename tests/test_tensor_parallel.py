"""Tensor parallelism on CPU: a tp 2 or tp 4 engine runs as one process per rank (gloo all-reduces)
and gives exactly the tokens of tp 1, through `LLM`, `trtc run` (its ranks started by rank 0, or
by torchrun) and `trtc bench`; ranks started with mpirun's environment meet and check that they
run one build."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from trtc.cli import main
from trtc.compiler.build import build_from_hf
from trtc.formats.build_config import BuildConfig
from trtc.formats.build_id import read_build_id
from trtc.llm import LLM
from trtc.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=20, end_id=-1)
SAMPLED = SamplingParams(max_tokens=20, end_id=-1, temperature=1.0, top_k=40, seed=5, logprobs=True)
FORCED = [3 + (7 * i) % 128 for i in range(70)]  # shares no prefix with prompts(): every row is computed
TEXTS = ["w1 w2 w3", "w7 " * 30, "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49 w50"]


def prompts(n: int = 10) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 131, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def run_llm(engine, **kw):
    """Greedy and sampled tokens (logprobs) of prompts() through a small pool (preemption), and
    the teacher-forced logits of one prompt."""
    with LLM(engine, kv_cache_max_tokens=160, **kw) as llm:
        greedy = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
        sampled = llm.generate(prompts(3), SAMPLED)
        logits = llm.executor.prompt_logits([FORCED])[0]
        stats = llm.executor.scheduler.stats()
    return greedy, [o.token_ids for o in sampled], [o.outputs[0].logprobs for o in sampled], logits, stats


@pytest.fixture(scope="module")
def tp1(tp_engines):
    return run_llm(tp_engines[1][1])


def test_tp2_gives_the_tokens_of_tp1(tp_engines, tp1):
    greedy, sampled, logprobs, logits, stats = run_llm(tp_engines[1][2])
    assert stats["num_preemptions"] > 0, "the pool was meant to force preemption"
    assert greedy == tp1[0]
    assert sampled == tp1[1]  # sampled on rank 0 from the gathered vocabulary (its padding cut off)
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(tp1[2]), atol=1e-4)
    assert logits.shape == tp1[3].shape == (len(FORCED), 131)
    assert rel(logits, tp1[3]) < 1e-5


def test_tp2_with_speculation_gives_the_greedy_tokens_of_tp1(tp_engines, tp1):
    """n-gram drafts verified on two ranks, through a pool small enough to preempt: tp 1's greedy tokens."""
    from trtc.runtime.speculative import SpeculativeConfig

    with LLM(tp_engines[1][2], kv_cache_max_tokens=160, speculative_config=SpeculativeConfig(max_draft_len=3)) as llm:
        greedy = [o.token_ids for o in llm.generate(prompts(), GREEDY)]
        assert llm.executor.spec_stats.num_draft_tokens > 0
        assert llm.executor.scheduler.stats()["used_blocks"] == 0
    assert greedy == tp1[0]


def test_tp4_gives_the_tokens_of_tp1(tp_engines, tp1):
    """Four ranks, each with one of the two KV heads (replicated) and 33 of the 132 padded vocabulary rows."""
    with LLM(tp_engines[1][4], kv_cache_max_tokens=512) as llm:
        greedy = [o.token_ids for o in llm.generate(prompts(4), SamplingParams(max_tokens=6, end_id=-1))]
    assert greedy == [t[:6] for t in tp1[0][:4]]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_bf16_tp2_adds_no_error_beyond_bf16(tp_engines, tp1, tmp_path):
    """bf16 sums the ranks' partials in bf16, so its logits differ from tp 1's by rounding: tp 2 is
    as close to the float32 model as tp 1 is, and predicts the same tokens."""
    hf, _ = tp_engines
    config = BuildConfig(max_batch_size=8, max_num_tokens=24, tokens_per_block=4, max_seq_len=96)
    logits = []
    for tp in (1, 2):
        engine = build_from_hf(hf, tmp_path / f"tp{tp}", tp_size=tp, dtype="bfloat16", build_config=config, progress=False)
        with LLM(engine, kv_cache_max_tokens=512) as llm:
            logits.append(llm.executor.prompt_logits([FORCED])[0])
    f32 = tp1[3]
    assert rel(logits[1], f32) < max(2 * rel(logits[0], f32), 1e-3) < 0.05
    assert float((logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean()) >= 0.95


def test_rank_files_carry_the_build_id(tp_engines, tmp_path):
    _, engines = tp_engines
    config = json.loads((engines[2] / "config.json").read_text())
    assert len(config["build_id"]) == 16
    assert [read_build_id(engines[2] / f"rank{r}.engine") for r in range(2)] == [config["build_id"]] * 2
    ids = {json.loads((e / "config.json").read_text())["build_id"] for e in engines.values()}
    assert len(ids) == 3  # one per build


def cli_json(args: list, out, timeout: float = 120, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list]:
    result = subprocess.run([sys.executable, *map(str, args), "--output_json", str(out)], capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr
    return result, json.loads(out.read_text())


def run_args(engine) -> list:
    return ["-m", "trtc.cli", "run", "--engine_dir", engine, "--input_text", *TEXTS, "--max_output_len", 16,
            "--end_id", -1]


@pytest.fixture(scope="module")
def tp1_run(tp_engines):
    with LLM(tp_engines[1][1]) as llm:
        return [{"output_ids": o.token_ids} for o in llm.generate(TEXTS, SamplingParams(max_tokens=16, end_id=-1))]


def test_trtc_run_starts_the_ranks_itself(tp_engines, tp1_run, tmp_path):
    result = CliRunner().invoke(main, [str(a) for a in run_args(tp_engines[1][2])[2:]] + ["--output_json", str(tmp_path / "o.json")])
    assert result.exit_code == 0, result.output
    records = json.loads((tmp_path / "o.json").read_text())
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in tp1_run]
    assert f'Output [Text 2 Beam 0]: "{records[2]["output_text"]}"' in result.output


def test_a_program_that_does_not_close_its_engine_ends(tp_engines):
    """The ranks are stopped when rank 0's program ends, closed or not."""
    code = ("from trtc.runtime.executor import Executor; from trtc.runtime.sampling_params import SamplingParams; "
            f"ex = Executor({str(tp_engines[1][2])!r}, kv_cache_max_tokens=256); "
            "print(ex.ranks.processes.procs[1].pid); ex.add_request([5, 6, 7], SamplingParams(max_tokens=4)); "
            "ex.run_until_complete()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(result.stdout.split()[-1]), 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trtc_run_under_torchrun(tp_engines, tp1_run, tmp_path):
    """torchrun starts both ranks; rank 1 serves inside LLM(...) and ends there, printing nothing."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, *run_args(tp_engines[1][2])]
    result, records = cli_json(args, tmp_path / "out.json")
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in tp1_run]
    assert result.stdout.count("Output [Text 0 Beam 0]") == 1


def test_tp2_across_two_nodes_under_torchrun(tp_engines, tp1_run, tmp_path):
    """Two torchrun launch groups, as on two nodes (`--nnodes 2 --node_rank k`, one rank each, rank 0's
    host as MASTER_ADDR: loopback here), each reading its own copy of the engine directory, give tp 1's
    tokens; the second node's rank serves inside LLM(...) and prints nothing."""
    copy = tmp_path / "node1" / "engine"
    shutil.copytree(tp_engines[1][2], copy)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}

    def node(k: int, engine) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(k), "--nproc_per_node",
               "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *map(str, run_args(engine)),
               "--output_json", str(tmp_path / f"node{k}.json")]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    nodes = [node(0, tp_engines[1][2]), node(1, copy)]
    outs = [p.communicate(timeout=180) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    records = json.loads((tmp_path / "node0.json").read_text())
    assert [r["output_ids"] for r in records] == [r["output_ids"] for r in tp1_run]
    assert outs[0][0].count("Output [Text 0 Beam 0]") == 1
    assert "Output [" not in outs[1][0] and not (tmp_path / "node1.json").exists()


def mpirun_env(rank: int, port: int) -> dict:
    """The environment Open MPI's mpirun gives rank `rank` of 2 on one node."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "MASTER_PORT": str(port)}


def test_ranks_of_different_builds_are_refused(tp_engines, other_tp2_engine):
    """Under mpirun each rank may read its own copy of the engine directory (one per node): copies
    of different builds are refused by rank 0 with one line, once the ranks have met."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "trtc.cli", "bench", "--engine_dir", str(e), "--isl", "4", "--osl", "2"],
                              env=mpirun_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, e in enumerate([tp_engines[1][2], other_tp2_engine])]
    outs = [p.communicate(timeout=120) for p in procs]
    assert procs[0].returncode == 1 and procs[1].returncode == 1
    lines = [line for line in outs[0][1].splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in outs[0][1], outs[0][1]
    assert "rank 1 runs build" in lines[0] and "give every rank the same engine directory" in lines[0]
    assert outs[1] == ("", "")  # rank 1 leaves the reporting to rank 0


def test_trtc_bench_on_tp2(tp_engines, tmp_path):
    result = CliRunner().invoke(main, ["bench", "--engine_dir", str(tp_engines[1][2]), "--isl", "12", "--osl", "4",
                                       "--num_requests", "3", "--output_json", str(tmp_path / "b.json")])
    assert result.exit_code == 0, result.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["num_requests"] == 3 and b["output_tokens_per_s"] > 0


def test_tp2_prompt_logprobs_equal_hf(tp_engines):
    """Prompt logprobs under tp 2 (the vocab-parallel LM head gathered in chunks of max_batch_size
    rows on both ranks, 24-token prefill chunks) equal HF's log_softmax of the prompt, top 3 too."""
    from models import load_hf

    hf, engines = tp_engines
    with torch.no_grad():
        want = load_hf(hf).float()(torch.tensor([FORCED])).logits[0].double().log_softmax(-1)  # [70, vocab]
    with LLM(engines[2]) as llm:
        out = llm.generate(FORCED, SamplingParams(max_tokens=1, prompt_logprobs=3))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(FORCED)
    for j, (token, entry) in enumerate(zip(FORCED[1:], out.prompt_logprobs[1:])):
        assert abs(entry[token].logprob - float(want[j, token])) < 1e-4
        top = sorted((t for t, lp in entry.items() if lp.rank <= 3))
        assert top == sorted(want[j].topk(3).indices.tolist())

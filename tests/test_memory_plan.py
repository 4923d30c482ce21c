"""The memory plan against what a step holds, on CPU: the plan's activation, logits and sampling
figures bound the peak of the worst step (every tensor the forward and the sampler allocate, tracked
as it is created and freed), `trtc build --dry_run` and the runtime's load line print the same
figures, and the bounded chunks (LM head rows, sampling rows, logprobs) change no result."""

from __future__ import annotations

import logging
import re
import weakref

import pytest
import torch
from cli_helpers import cli
from models import make_hf_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trtc.compiler.memory_plan import decode_split_partials, memory_plan
from trtc.formats.engine import Engine
from trtc.formats.quant_layout import QuantConfig
from trtc.plugins.sampling.sampler import (
    SamplingBatch,
    draw_noise,
    make_generator,
    sample,
    token_logprobs,
    top_logprobs,
)
from trtc.runtime.executor import Executor
from trtc.runtime.model_runner import ModelRunner
from trtc.runtime.profile_run import worst_sampling
from trtc.runtime.sampling_params import SamplingParams

FLAGS = ["--max_batch_size", 16, "--max_seq_len", 128, "--max_num_tokens", 256, "--tokens_per_block", 16]
FIGURES = ("activations", "logits", "sampling", "graphs")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    hf = make_hf_model(root / "hf", "llama3_gqa")
    result = cli("build", "--model_dir", hf, "--output_dir", root / "engine", *FLAGS)
    assert result.exit_code == 0, result.output
    return hf, root / "engine"


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, from their creation to their release; `peak` the most
    alive at once (tensors that existed before, and views of them, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or ptr in inputs or ptr in self.tracked:
                continue
            self.tracked.add(ptr)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self.tracked.discard(ptr)
        self.live -= n


def _plan(e: Engine, itemsize: int | None = None):
    p = e.pretrained
    return memory_plan(e.graph, e.mapping, p.dtype, QuantConfig.from_dict(p.quantization), e.build_config,
                       activation_itemsize=itemsize)


def test_plan_bounds_the_worst_step_measured_on_cpu(engine):
    """The worst step the scheduler admits (max_num_tokens prompt tokens, logits of max_batch_size
    rows), then sampling of every row with every processor on and top-20 logprobs: what the forward
    holds at its peak is within activations + logits (the attention partials, a GPU kernel's, aside),
    and what the sampler adds is within sampling."""
    e = Engine.load(engine[1])
    runner = ModelRunner(e, torch.device("cpu"))
    plan = _plan(e, itemsize=4)  # a CPU computes in float32
    step = runner.largest_step()
    runner.forward(*step)  # first-use tables (RoPE) outside the measure
    with LiveBytes() as forward:
        logits = runner.forward(*step)
    assert logits.shape[0] == e.build_config.max_batch_size
    tokens = e.build_config.max_num_tokens
    per_token_bound = plan.activations - decode_split_partials(e.graph, e.mapping, tokens) + plan.logits
    assert forward.peak > per_token_bound / 4, (forward.peak, per_token_bound)  # the measure sees the step
    assert forward.peak <= per_token_bound, (forward.peak, per_token_bound)
    with LiveBytes() as sampling:
        worst_sampling(logits)
    assert 0 < sampling.peak <= plan.sampling, (sampling.peak, plan.sampling)


def test_dry_run_and_load_line_print_the_same_figures(engine, caplog):
    hf, engine_dir = engine
    dry = cli("build", "--model_dir", hf, "--dry_run", *FLAGS)
    assert dry.exit_code == 0, dry.output
    planned = dict(re.findall(rf"^\s+({'|'.join(FIGURES)})\s+([\d.]+ [GM]iB)", dry.output, re.M))
    assert set(planned) == set(FIGURES), dry.output
    with caplog.at_level(logging.INFO, logger="trtc"):
        ex = Executor(engine_dir, device="cpu", kv_cache_max_tokens=1024)
        ex.close()
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    loaded = dict(re.findall(rf"\b({'|'.join(FIGURES)}) ([\d.]+ [GM]iB)", line.split("memory plan:")[1]))
    assert loaded == planned, line
    assert "KV pool" in line


def test_lm_head_chunks_change_no_logit(engine):
    e = Engine.load(engine[1])
    runner = ModelRunner(e, torch.device("cpu"))
    h = torch.randn(37, e.graph.hidden_size, generator=torch.Generator().manual_seed(0))
    whole = runner.compute_logits(h, chunk_rows=1000)
    for rows in (1, 5, 16):
        chunked = runner.compute_logits(h, chunk_rows=rows)
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)
        assert torch.equal(chunked.argmax(-1), whole.argmax(-1))
    out = torch.full((40, e.graph.vocab_size), float("nan"))
    assert runner.compute_logits(h, out, chunk_rows=8).data_ptr() == out.data_ptr()
    torch.testing.assert_close(out[:37], whole, rtol=1e-6, atol=1e-6)


def _batch(n: int, vocab: int) -> SamplingBatch:
    params = [SamplingParams(temperature=0.7, top_k=[0, 5][i % 2], top_p=0.8, min_p=0.02, repetition_penalty=1.2,
                             presence_penalty=0.3, frequency_penalty=0.2, seed=100 + i) if i % 3 else SamplingParams()
              for i in range(n)]
    prompts = [[(7 * i + j) % vocab for j in range(5)] for i in range(n)]
    outputs = [[(3 * i + j) % vocab for j in range(i % 4)] for i in range(n)]
    return SamplingBatch.from_requests(params, prompts, outputs, [make_generator(p.seed, "cpu") for p in params],
                                       vocab, "cpu")


def test_sampling_chunks_equal_the_whole_batch():
    """Rows sampled in chunks get the tokens and logprobs of the whole batch: seeded rows draw the
    same noise from their own generators, greedy rows take the same argmax."""
    n, vocab = 23, 301
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(1)) * 3
    whole = sample(logits, _batch(n, vocab), chunk_rows=1000)
    for rows in (1, 4, 10):
        tokens, logprobs = sample(logits, _batch(n, vocab), chunk_rows=rows)
        assert torch.equal(tokens, whole[0])
        torch.testing.assert_close(logprobs, whole[1], rtol=0, atol=1e-6)
    noise = draw_noise(_batch(n, vocab), vocab, "cpu")  # given noise: the same race in any chunking
    assert torch.equal(sample(logits, _batch(n, vocab), noise, chunk_rows=3)[0],
                       sample(logits, _batch(n, vocab), noise, chunk_rows=1000)[0])
    tokens = whole[0]
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_rows=4),
                               logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
    rows = [0, 3, 4, 9, 22]
    values, ids = top_logprobs(logits, rows, 7, chunk_rows=2)
    expected = logits[rows].log_softmax(-1).topk(7)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(values, expected.values)

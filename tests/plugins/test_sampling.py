"""The sampling op's reference against HF transformers' own logits processors, plus its draw.

Tolerances: kept logits within 1e-6 of HF's (same float32 ops), dropped positions equal (-inf) exactly;
logprobs within 1e-6 of log_softmax; distributions by a chi-square bound stated in the test.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from trtc.plugins.sampling import SamplingBatch, draw_noise, make_generator, process_logits, sample
from trtc.plugins.sampling.sampler import (
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
)
from trtc.runtime.sampling_params import SamplingParams

V = 1000


def _logits(b: int, v: int = V, seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def _batch(params, prompt=None, output=None, vocab=V, seeded=False) -> SamplingBatch:
    n = len(params)
    prompt = prompt if prompt is not None else [[] for _ in range(n)]
    output = output if output is not None else [[] for _ in range(n)]
    gens = [make_generator(p.seed, "cpu") for p in params]
    return SamplingBatch.from_requests(params, prompt, output, gens, vocab, "cpu")


def _assert_same_logits(ours: torch.Tensor, hf: torch.Tensor) -> None:
    """Dropped (-inf) positions identical, kept logits within 1e-6."""
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    kept = ~torch.isinf(hf)
    torch.testing.assert_close(ours[kept], hf[kept], atol=1e-6, rtol=0)


def _hf_row(processor, row_logits: torch.Tensor, input_ids=None) -> torch.Tensor:
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    return processor(ids, row_logits[None].clone())[0]


# ---- each processor against HF, per row with different parameters ------------------------------------


def test_repetition_penalty_matches_hf():
    penalties = [1.0, 1.3, 0.7, 2.0]
    logits = _logits(len(penalties))
    g = torch.Generator().manual_seed(1)
    seen_ids = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 40, 1, 300)]
    seen = torch.zeros(len(penalties), V, dtype=torch.bool)
    for i, ids in enumerate(seen_ids):
        seen[i, ids] = True
    ours = apply_repetition_penalty(logits, seen, torch.tensor(penalties))
    for i, p in enumerate(penalties):
        hf = _hf_row(RepetitionPenaltyLogitsProcessor(penalty=p), logits[i], seen_ids[i])
        _assert_same_logits(ours[i], hf)
    assert not torch.equal(ours[1], logits[1])  # the penalty did something


def test_temperature_matches_hf():
    temps = [0.5, 1.0, 1.7, 0.1]
    logits = _logits(len(temps))
    ours = apply_temperature(logits, torch.tensor(temps))
    for i, t in enumerate(temps):
        _assert_same_logits(ours[i], _hf_row(TemperatureLogitsWarper(t), logits[i]))


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_top_k_matches_hf(ties):
    ks = [0, 1, 5, 50, V + 10]  # 0 = off; k > V keeps everything
    logits = _logits(len(ks))
    if ties:  # integer logits: many ties at the k-th value, which HF keeps
        logits = logits.round()
    ours = apply_top_k(logits, torch.tensor(ks))
    for i, k in enumerate(ks):
        hf = logits[i] if k == 0 else _hf_row(TopKLogitsWarper(k), logits[i])
        _assert_same_logits(ours[i], hf)
        if k and not ties:
            assert int((~torch.isinf(ours[i])).sum()) == min(k, V)


def test_top_p_matches_hf():
    ps = [1.0, 0.9, 0.5, 0.01, 0.999]
    logits = _logits(len(ps))
    ours = apply_top_p(logits, torch.tensor(ps))
    for i, p in enumerate(ps):
        _assert_same_logits(ours[i], _hf_row(TopPLogitsWarper(p), logits[i]))
    assert int((~torch.isinf(ours[3])).sum()) >= 1


def test_top_p_exact_boundary_and_underflow_match_hf():
    """Cumulative probability exactly at 1 - top_p is dropped (HF's `<=`); at top_p = 1, tokens whose
    probability underflows to 0 are dropped too."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, -200.0], [0.0, 0.0, 0.0, 0.0, -200.0], [1.0, 0.0, -150.0, -200.0, 0.5]])
    logits = torch.cat([logits, _logits(1, v=5)])
    ps = [0.5, 0.75, 1.0, 1e-9]  # 1 - 1e-9 rounds to 1 in float32: only the keep-the-top rule saves a token
    ours = apply_top_p(logits, torch.tensor(ps))
    for i, p in enumerate(ps):
        _assert_same_logits(ours[i], _hf_row(TopPLogitsWarper(p), logits[i]))
    assert int((~torch.isinf(ours[0])).sum()) == 2 and torch.isinf(ours[2, 3])
    assert int((~torch.isinf(ours[3])).sum()) == 1 and not torch.isinf(ours[3, logits[3].argmax()])


def test_min_p_matches_hf():
    ps = [0.0, 0.05, 0.3, 1.0]
    logits = _logits(len(ps))
    ours = apply_min_p(logits, torch.tensor(ps))
    for i, p in enumerate(ps):
        _assert_same_logits(ours[i], _hf_row(MinPLogitsWarper(p), logits[i]))


def test_process_logits_matches_hf_chain():
    """The whole chain, built from SamplingParams, equals HF's processor list row by row."""
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(top_k=3, repetition_penalty=0.8),
        SamplingParams(temperature=0.5, min_p=0.1),
        SamplingParams(temperature=1.0),
    ]
    g = torch.Generator().manual_seed(2)
    prompt = [torch.randint(0, V, (n,), generator=g).tolist() for n in (30, 3, 10, 0, 7)]
    output = [torch.randint(0, V, (n,), generator=g).tolist() for n in (4, 0, 12, 2, 1)]
    logits = _logits(len(params))
    ours = process_logits(logits, _batch(params, prompt, output))
    for i, p in enumerate(params):
        chain = LogitsProcessorList()
        if p.repetition_penalty != 1.0:
            chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
        if p.temperature is not None:
            chain.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            chain.append(TopKLogitsWarper(p.top_k))
        if p.top_p is not None:
            chain.append(TopPLogitsWarper(p.top_p))
        if p.min_p is not None:
            chain.append(MinPLogitsWarper(p.min_p))
        _assert_same_logits(ours[i], _hf_row(chain, logits[i], prompt[i] + output[i] or None))


def test_presence_frequency_match_plain_loop():
    presence, frequency = [0.0, 0.5, -1.0, 2.0], [0.3, 0.0, 1.5, -2.0]
    g = torch.Generator().manual_seed(3)
    output = [torch.randint(0, 50, (n,), generator=g).tolist() for n in (10, 25, 0, 60)]
    params = [SamplingParams(presence_penalty=p, frequency_penalty=f) for p, f in zip(presence, frequency)]
    batch = _batch(params, output=output)
    logits = _logits(len(params))
    ours = process_logits(logits, batch)
    expected = logits.clone()
    for i in range(len(params)):
        for tok in set(output[i]):
            count = output[i].count(tok)
            expected[i, tok] -= presence[i] * (count > 0) + frequency[i] * count
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert not torch.equal(ours[1], logits[1])
    # One processor alone (the other None) gives the same as the other at 0.
    alone = apply_presence_frequency(logits, batch.output_counts, batch.presence_penalty, None)
    zeros = apply_presence_frequency(logits, batch.output_counts, batch.presence_penalty, torch.zeros(4))
    torch.testing.assert_close(alone, zeros, atol=0, rtol=0)


# ---- greedy and logprobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax(dtype):
    params = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=1, temperature=2.0)]
    logits = _logits(len(params)).to(dtype)
    batch = _batch(params)
    tokens, logprobs = sample(logits, batch)
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(process_logits(logits, batch), logits.float())  # greedy rows: no warper touches them
    assert torch.equal(tokens, logits.float().argmax(-1))
    expected = logits.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)


def test_greedy_row_takes_the_logit_argmax_when_softmax_ties():
    """0.25 and the next float32 above it have equal softmax probabilities; greedy must still pick the larger
    logit, also when the batch has sampling rows (the path that computes probabilities)."""
    a = torch.tensor(0.25)
    row = torch.stack([a, torch.nextafter(a, torch.tensor(1.0))])
    assert row.softmax(-1)[0] == row.softmax(-1)[1]
    tokens, _ = sample(torch.stack([row, row]), _batch([SamplingParams(), SamplingParams(temperature=1.0)], vocab=2))
    assert int(tokens[0]) == 1


def test_logprobs_ignore_processing_and_greedy_rows_mixed_with_sampling_rows():
    params = [
        SamplingParams(temperature=0.3, top_k=5, repetition_penalty=1.5),
        SamplingParams(repetition_penalty=1.5),
    ]
    logits = _logits(2)
    output = [[1, 2, 3], [int(logits[1].argmax())]]  # the greedy row's argmax is penalised away
    batch = _batch(params, output=output)
    tokens, logprobs = sample(logits, batch)
    expected = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected, atol=1e-6, rtol=0)
    # The greedy row takes the argmax after the penalty (as HF greedy search with repetition_penalty).
    assert int(tokens[1]) == int(process_logits(logits, batch)[1].argmax())
    assert int(tokens[1]) != output[1][0]


@pytest.mark.parametrize("with_sampling_row", [False, True])
def test_greedy_rows_draw_nothing(with_sampling_row):
    gen = make_generator(7, "cpu")
    state = gen.get_state()
    params = [SamplingParams(seed=7)] + ([SamplingParams(temperature=1.0)] if with_sampling_row else [])
    gens = [gen] + [None] * with_sampling_row
    batch = SamplingBatch.from_requests(params, [[]] * len(params), [[]] * len(params), gens, V, "cpu")
    sample(_logits(len(params)), batch)
    assert torch.equal(gen.get_state(), state)


# ---- the draw --------------------------------------------------------------------------------------


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    kept = probs > 0
    return float((((counts[kept] - n * probs[kept]) ** 2) / (n * probs[kept])).sum())


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
        SamplingParams(top_p=0.7),
    ],
    ids=["plain", "all_warpers", "top_p"],
)
def test_empirical_frequencies_match_processed_softmax(params):
    """20,000 draws (one batch of identical unseeded rows) over an 8-token vocabulary. Chi-square with at
    most 7 degrees of freedom must stay below 29.9 (P = 1e-4 under the null); dropped tokens never appear."""
    torch.manual_seed(0)
    n, v = 20_000, 8
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    batch = _batch([params] * n, vocab=v)
    probs = process_logits(row[None], _batch([params], vocab=v))[0].softmax(-1)
    tokens, _ = sample(row.expand(n, v), batch)
    counts = torch.bincount(tokens, minlength=v).double()
    assert counts[probs == 0].sum() == 0
    assert _chi_square(counts, probs.double()) < 29.9
    if params.top_k or params.top_p:
        assert int((probs == 0).sum()) > 0  # the warpers did drop something to check against


def test_top_k_top_p_never_emit_dropped_tokens_large_vocab():
    params = [SamplingParams(top_k=10), SamplingParams(top_p=0.3), SamplingParams(temperature=2.0, top_k=50, top_p=0.5)]
    logits = _logits(len(params), scale=2.0)
    batch = _batch(params * 500)
    allowed = ~torch.isinf(process_logits(logits, _batch(params)))  # [3, V]
    tokens, _ = sample(logits.repeat(500, 1), batch)
    assert allowed.repeat(500, 1).gather(1, tokens[:, None]).all()


def test_noise_contract_for_kernels():
    """Given the noise, the token is argmax(softmax(processed) / noise): what a fast kernel must reproduce."""
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=1), SamplingParams(top_k=40), SamplingParams()]
    logits = _logits(3)
    batch = _batch(params)
    noise = draw_noise(batch, V, "cpu")
    assert torch.equal(noise[2], torch.ones(V))  # greedy row: no draw
    tokens, _ = sample(logits, batch, noise=noise)
    expected = (process_logits(logits, batch).softmax(-1) / noise).argmax(-1)
    expected[2] = logits[2].argmax()
    assert torch.equal(tokens, expected)


# ---- seeds -----------------------------------------------------------------------------------------


def _run_seeded(seed: int, steps: int, step_logits: list[torch.Tensor]) -> list[int]:
    params = [SamplingParams(temperature=1.0, seed=seed)]
    gens = [make_generator(seed, "cpu")]
    out = []
    for t in range(steps):
        batch = SamplingBatch.from_requests(params, [[]], [out], gens, V, "cpu")
        out.append(int(sample(step_logits[t][None], batch)[0][0]))
    return out


def test_same_seed_same_tokens_different_seed_different_tokens():
    steps = [_logits(1, seed=10 + t, scale=1.0)[0] for t in range(8)]
    assert _run_seeded(123, 8, steps) == _run_seeded(123, 8, steps)
    assert _run_seeded(123, 8, steps) != _run_seeded(124, 8, steps)


def test_seeded_row_is_unchanged_by_the_batch_around_it():
    """A seeded request (with penalties, so it also depends on its own outputs) over 6 steps: alone, and in
    batches whose size, row position and neighbours (greedy, unseeded, other seeds) change every step."""
    seed, steps = 99, 6
    target = SamplingParams(
        temperature=0.9, top_k=100, top_p=0.95, presence_penalty=0.5, repetition_penalty=1.1, seed=seed
    )
    prompt = [3, 4, 5]
    step_logits = [_logits(1, seed=50 + t, scale=1.5)[0] for t in range(steps)]

    def run(neighbours_per_step):
        gen = make_generator(seed, "cpu")
        other_gens = {}
        out = []
        for t in range(steps):
            before, after = neighbours_per_step(t)
            rows = before + [target] + after
            gens = [gen if p is target else other_gens.setdefault((t, i), make_generator(p.seed, "cpu"))
                    for i, p in enumerate(rows)]
            outputs = [out if p is target else [1, 2] for p in rows]
            batch = SamplingBatch.from_requests(rows, [prompt] * len(rows), outputs, gens, V, "cpu")
            logits = _logits(len(rows), seed=200 + t)
            logits[len(before)] = step_logits[t]
            out.append(int(sample(logits, batch)[0][len(before)]))
        return out

    alone = run(lambda t: ([], []))
    crowd = [SamplingParams(), SamplingParams(temperature=1.2), SamplingParams(top_p=0.5, seed=5),
             SamplingParams(min_p=0.2, frequency_penalty=1.0)]
    crowded = run(lambda t: (crowd[: t % 3], crowd[t % 2:]))
    assert alone == crowded


def test_append_tokens_equals_rebuild():
    params = [SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, temperature=1.0)] * 3
    prompt, output = [[1, 2], [3], []], [[5], [], [7, 7]]
    batch = _batch(params, prompt, output)
    new = torch.tensor([5, 9, 7])
    batch.append_tokens(new)
    rebuilt = _batch(params, prompt, [o + [int(t)] for o, t in zip(output, new)])
    assert torch.equal(batch.prompt_mask, rebuilt.prompt_mask)
    assert torch.equal(batch.output_counts, rebuilt.output_counts)
    assert batch.output_counts[0, 5] == 2 and batch.output_counts[2, 7] == 3


def test_off_processors_are_skipped_and_out_of_vocab_ids_ignored():
    batch = _batch([SamplingParams(), SamplingParams(top_p=1.0)], prompt=[[1, V + 5], [2]])
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None and batch.temperature is None
    assert batch.prompt_mask is None and batch.output_counts is None
    batch = _batch([SamplingParams(repetition_penalty=1.2)], prompt=[[1, V + 5, -1]])
    assert batch.prompt_mask.sum() == 1 and batch.prompt_mask[0, 1]
    with pytest.raises(ValueError, match="one entry per request"):
        SamplingBatch.from_requests([SamplingParams()], [[], []], [[]], [None], V, "cpu")


# ---- properties ------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, 40),
    top_p=st.floats(0.01, 1.0),
    min_p=st.floats(0.0, 1.0),
)
def test_warpers_keep_the_argmax_and_sample_inside_the_kept_set(seed, temperature, top_k, top_p, min_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    logits = _logits(1, v=32, seed=seed)
    batch = _batch([params], vocab=32)
    processed = process_logits(logits, batch)[0]
    kept = ~torch.isinf(processed)
    assert kept[int(logits[0].argmax())]
    token, logprob = sample(logits, batch)
    assert kept[int(token)]
    assert math.isfinite(float(logprob))


# ---- the same reference on a GPU ---------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_given_the_same_noise(dtype):
    """On CUDA the op runs with its tensors on the GPU and agrees with the CPU run: dropped positions equal,
    kept logits within 1e-5 (different exp/sum kernels), the same tokens from the same noise."""
    params = [
        SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=4),
        SamplingParams(temperature=1.3, top_p=0.8, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(repetition_penalty=1.1),
        SamplingParams(min_p=0.1),
    ]
    prompt, output = [[1, 2, 3]] * 4, [[4, 4], [5], [], [6, 7, 7]]
    logits = _logits(len(params)).to(dtype)

    def build(device):
        gens = [make_generator(p.seed, device) for p in params]
        return SamplingBatch.from_requests(params, prompt, output, gens, V, device)

    cpu, gpu = build("cpu"), build("cuda")
    assert gpu.prompt_mask.is_cuda and gpu.top_k.is_cuda and gpu.generators[0].device.type == "cuda"
    ours = process_logits(logits.cuda(), gpu).cpu()
    ref = process_logits(logits, cpu)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    torch.testing.assert_close(ours[~torch.isinf(ref)], ref[~torch.isinf(ref)], atol=1e-5, rtol=0)
    noise = draw_noise(gpu, V, "cuda")
    assert noise.is_cuda and torch.equal(noise[2].cpu(), torch.ones(V))
    tokens, logprobs = sample(logits.cuda(), gpu, noise=noise)
    ref_tokens, ref_logprobs = sample(logits, cpu, noise=noise.cpu())
    assert torch.equal(tokens.cpu(), ref_tokens)
    torch.testing.assert_close(logprobs.cpu(), ref_logprobs, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_seeded_row_is_unchanged_by_the_batch_around_it():
    seed, steps = 11, 5
    target = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    neighbours = [SamplingParams(), SamplingParams(temperature=0.5), SamplingParams(top_k=3, seed=2)]
    step_logits = [_logits(1, seed=70 + t, scale=1.0)[0] for t in range(steps)]

    def run(with_neighbours):
        gen = make_generator(seed, "cuda")
        out = []
        for t in range(steps):
            rows = (neighbours[: t % 3] if with_neighbours else []) + [target]
            gens = [gen if p is target else make_generator(p.seed, "cuda") for p in rows]
            batch = SamplingBatch.from_requests(rows, [[]] * len(rows), [[]] * len(rows), gens, V, "cuda")
            logits = _logits(len(rows), seed=300 + t)
            logits[-1] = step_logits[t]
            out.append(int(sample(logits.cuda(), batch)[0][-1]))
        return out

    assert run(False) == run(True) == run(False)


def test_logit_bias_in_a_batch_past_one_chunk():
    """300 greedy rows, sampled in chunks of 256: a bias on row 299 steers row 299 (and no other row), as
    a bias on row 3 steers row 3."""
    logits = _logits(300)
    params = [SamplingParams()] * 300
    params[3] = SamplingParams(logit_bias={7: 100.0})
    params[299] = SamplingParams(logit_bias={11: 100.0})
    tokens, _ = sample(logits, _batch(params))
    want = logits.argmax(dim=-1)
    want[3], want[299] = 7, 11
    assert tokens.tolist() == want.tolist()

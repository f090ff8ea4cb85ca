import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from glm4serve.engine.processors import SampleRow, TokenCounts, apply_processors
from glm4serve.engine.sampler import Sampled, Sampler, apply_truncation, inverse_transform, make_generator, uniforms
from glm4serve.engine.types import SamplingParams


def row(prompt=(), output=(), generator=None, stop_ids=(), **params) -> SampleRow:
    return SampleRow(
        params=SamplingParams(**params),
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        generator=generator,
        stop_token_ids=frozenset(stop_ids),
    )


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()  # [1, V]


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


# --- greedy --------------------------------------------------------------------------------------


def test_greedy_is_argmax_and_leaves_logits_untouched():
    logits = random_logits(6, 100, seed=0)
    before = logits.clone()
    out = Sampler()(logits, [row(temperature=0.0) for _ in range(6)])
    assert [s.token_id for s in out] == logits.argmax(-1).tolist()
    assert all(isinstance(s, Sampled) and s.logprob is None for s in out)
    assert torch.equal(logits, before)


def test_greedy_row_takes_argmax_of_processed_logits():
    logits = torch.tensor([[1.0, 5.0, 2.0, 0.0]])
    # bias pushes token 2 over token 1: argmax of the raw logits would be 1
    out = Sampler()(logits, [row(temperature=0.0, logit_bias={2: 4.0})])
    assert out[0].token_id == 2


@pytest.mark.parametrize("seed", range(5))
def test_top_k_1_and_tiny_top_p_equal_greedy(seed):
    logits = random_logits(4, 200, seed=seed)
    greedy = logits.argmax(-1).tolist()
    sampler = Sampler()
    for params in ({"top_k": 1}, {"top_p": 1e-6}):
        rows = [row(temperature=1.5, generator=make_generator(seed, i), **params) for i in range(4)]
        for _ in range(10):
            assert [s.token_id for s in sampler(logits, rows)] == greedy


# --- truncation ------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_best():
    logits = log_probs(0.1, 0.4, 0.2, 0.3)
    assert kept(apply_truncation(logits, [SamplingParams(top_k=2)])) == {1, 3}
    assert kept(apply_truncation(logits, [SamplingParams(top_k=0)])) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p, expected", [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(apply_truncation(logits, [SamplingParams(top_p=top_p)])) == expected


def test_top_p_applies_to_the_renormalized_top_k():
    # top_k=2 leaves (0.4, 0.3) -> (4/7, 3/7); top_p=0.5 then keeps token 0 only. Over the
    # unrenormalized probs token 1 would survive (mass before it 0.4 < 0.5).
    logits = log_probs(0.4, 0.3, 0.2, 0.1)
    assert kept(apply_truncation(logits, [SamplingParams(top_k=2, top_p=0.5)])) == {0}
    assert kept(apply_truncation(logits, [SamplingParams(top_p=0.5)])) == {0, 1}


@pytest.mark.parametrize("min_p, expected", [(0.0, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p_keeps_tokens_above_fraction_of_best(min_p, expected):
    logits = log_probs(0.5, 0.3, 0.15, 0.05)  # thresholds: min_p * 0.5
    assert kept(apply_truncation(logits, [SamplingParams(min_p=min_p)])) == expected


def test_min_p_sampling_never_draws_a_cut_token():
    logits = log_probs(0.5, 0.3, 0.15, 0.05).repeat(400, 1)
    g = make_generator(3, 0)
    out = Sampler()(logits, [row(min_p=0.5, generator=g) for _ in range(400)])
    assert {s.token_id for s in out} == {0, 1}


def test_truncation_is_per_row():
    logits = log_probs(0.5, 0.3, 0.15, 0.05).repeat(3, 1)
    out = apply_truncation(logits, [SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=0.5)])
    assert [kept(out[i : i + 1]) for i in range(3)] == [{0}, {0, 1, 2, 3}, {0, 1}]
    # every row with a top_k (the partial-sort path), different k and top_p per row
    logits = log_probs(0.05, 0.5, 0.15, 0.3).repeat(3, 1)
    params = [SamplingParams(top_k=1), SamplingParams(top_k=3), SamplingParams(top_k=3, top_p=0.6)]
    out = apply_truncation(logits, params)
    assert [kept(out[i : i + 1]) for i in range(3)] == [{1}, {1, 2, 3}, {1, 3}]
    assert out[1, 3].item() == logits[1, 3].item()  # kept logits keep their value


def test_truncation_among_candidates_equals_a_full_sort():
    """Rows are cut among their best `candidates` tokens (or their top-k, when wider), and sorted
    whole only when their top-p set may reach past them: the same kept tokens and values as sorting
    every row whole. Peaked rows (top-p set within the 64 candidates) and flat ones (past them)."""
    vocab = 5000

    def check(scales, params):
        logits = torch.cat([random_logits(1, vocab, seed=i) * s for i, s in enumerate(scales)])
        whole = apply_truncation(logits, params, candidates=vocab)
        ours = apply_truncation(logits, params, candidates=64)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(whole))
        assert torch.equal(ours[torch.isfinite(ours)], whole[torch.isfinite(whole)])
        return torch.isfinite(whole).sum(dim=-1).tolist()

    sizes = check([8.0, 8.0, 0.3, 8.0, 0.3, 1.0],
                  [SamplingParams(top_p=0.9), SamplingParams(top_p=0.5, min_p=0.01), SamplingParams(top_p=0.9),
                   SamplingParams(top_k=200, top_p=0.95), SamplingParams(top_k=10), SamplingParams()])
    assert sizes[0] < 64 and sizes[2] > 64 and sizes[5] == vocab  # both paths taken
    sizes = check([0.3, 0.3, 8.0], [SamplingParams(top_k=3000, top_p=0.99), SamplingParams(top_p=0.999),
                                    SamplingParams(top_p=0.8)])
    assert sizes[0] > 64 and sizes[1] > 3000 and sizes[2] < 64


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_sampled_rows_draw_as_from_a_whole_sort_checking_the_candidates_with_the_token_ids():
    """The sampler draws among each row's candidates before it knows whether they hold its top-p set
    (the check would wait for the device mid-step); a row whose set reaches past them (a flat
    distribution) is drawn again, sorted whole, with the same uniform draw: seeded rows, flat and
    peaked, get the tokens a whole sort gives them, step after step. A peaked step reads nothing back
    before its token ids (no nonzero)."""
    vocab = 5000
    scales = [8.0, 0.3, 8.0, 0.3, 1.0]
    params = [dict(top_p=0.9), dict(top_p=0.95), dict(top_k=100, top_p=0.9), dict(top_p=0.5, min_p=0.01), dict()]
    for step in range(5):
        logits = torch.cat([random_logits(1, vocab, seed=10 * step + i) * s for i, s in enumerate(scales)])
        drawn = [[s.token_id for s in sampler(logits, [row(temperature=0.9, generator=make_generator(7 + step, i), **p)
                                                      for i, p in enumerate(params)])]
                 for sampler in (Sampler(candidates=vocab), Sampler(candidates=64))]
        assert drawn[0] == drawn[1]
    peaked = random_logits(2, vocab, seed=1) * 8.0
    rows = [row(temperature=0.9, top_p=0.9, generator=make_generator(1, i)) for i in (0, 1)]
    with CountOps() as counted:
        Sampler(candidates=64)(peaked, rows)
    assert "nonzero" not in " ".join(counted.ops), counted.ops


@pytest.mark.parametrize("vocab", [4096, 5000])  # whole chunks of 1024, and a padded last one
def test_sampling_follows_the_distribution_across_chunks(vocab):
    """Mass on tokens at both edges of a chunk and in the last one: the two-level search (chunk, then
    token) draws each as often as its probability says."""
    where, mass = [10, 1023, 1024, 2047, vocab - 1], [0.1, 0.2, 0.3, 0.15, 0.25]
    probs = torch.zeros(vocab)
    probs[where] = torch.tensor(mass)
    n = 4000
    gens = [make_generator(5, i) for i in range(n // 2)] + [None] * (n // 2)
    ids = inverse_transform(probs.repeat(n, 1), uniforms(gens, probs.device))
    counts = [int((ids == t).sum()) for t in where]
    assert sum(counts) == n  # nothing else drawn
    assert chi_square(counts, mass) < 25  # 4 dof: p ~ 5e-5


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.8, top_p=0.8),
                                    dict(temperature=0.7, top_k=5)], ids=str)
def test_nan_logits_still_give_token_ids_of_the_vocabulary(params):
    # a broken forward's NaN must not become an id past the vocabulary (or past a row's candidates)
    logits = torch.randn(2, 3000)
    logits[0, 5], logits[1] = float("nan"), float("nan")
    out = Sampler()(logits, [row(generator=make_generator(1, i), **params) for i in range(2)])
    assert all(0 <= s.token_id < 3000 for s in out)


@pytest.mark.parametrize("probs", [[0.0, 1.0, 0.0], [0.0, 0.0, 0.3, 0.7], [0.6, 0.4, 0.0, 0.0]])
def test_a_token_of_probability_zero_is_never_drawn(probs):
    # whatever the uniform draw, even 0: the first token of cumulative mass >= (1 - u) x total
    p = torch.tensor([probs]).repeat(500, 1)
    ids = inverse_transform(p, uniforms([make_generator(9, i) for i in range(250)] + [None] * 250, p.device))
    assert all(probs[t] > 0 for t in ids.tolist())


# --- processors ------------------------------------------------------------------------------------


def reference_processors(logits: list[float], r: SampleRow) -> list[float]:
    """Element by element, straight from the definitions."""
    p = r.params
    out = []
    for t, x in enumerate(logits):
        count = r.output_token_ids.count(t)
        if t in r.prompt_token_ids or count:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.presence_penalty * (count > 0) + p.frequency_penalty * count
        x += (p.logit_bias or {}).get(t, 0.0)
        if t in r.stop_token_ids and len(r.output_token_ids) < p.min_tokens:
            x = -math.inf
        out.append(x if p.greedy else x / p.temperature)
    return out


def test_penalties_change_exactly_the_expected_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    r = row(prompt=[0, 4], output=[1, 1, 2], repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_processors(logits, [r])
    # by hand: 0: prompt, 2/2 = 1. 1: -1*2 - 0.5 - 2*0.25 = -3. 2: 0.5/2 - 0.5 - 0.25 = -0.5.
    # 4: prompt, -2*2 = -4. 3 and 5 untouched. Presence/frequency ignore prompt tokens.
    assert out[0].tolist() == pytest.approx([1.0, -3.0, -0.5, 3.0, -4.0, 1.0])
    assert out[0].tolist() == pytest.approx(reference_processors(logits[0].tolist(), r))


def test_penalties_from_counts_kept_between_steps_match_the_definition():
    """A sequence's TokenCounts lives across its steps (one token a step, or several kept drafts, ids
    past the logits' width among them) and counts only what its output gained: each step's logits
    equal the definition's over the whole prompt and output."""
    vocab, gen = 50, torch.Generator().manual_seed(3)
    prompt = torch.randint(0, vocab + 5, (30,), generator=gen).tolist()
    counts, output = TokenCounts(), []
    for step in range(40):
        output += torch.randint(0, vocab + 5, (1 + step % 3,), generator=gen).tolist()
        r = row(prompt=prompt, output=output, repetition_penalty=1.4, presence_penalty=0.3, frequency_penalty=0.2)
        r.token_counts = counts
        logits = random_logits(1, vocab, seed=step)
        out = apply_processors(logits, [r])
        assert out[0].tolist() == pytest.approx(reference_processors(logits[0].tolist(), r), abs=1e-5), step
    assert counts._counted == len(output)


def test_penalties_keep_their_counts_on_the_logits_device():
    """Counts made before a row's first token must live where its logits do ("meta" stands in for a
    GPU here: any mix of devices raises there as on CUDA)."""
    counts = TokenCounts()
    for output in ([], [4, 5], [4, 5, 5]):
        r = row(prompt=[1, 2, 3], output=output, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.1)
        r.token_counts = counts
        assert apply_processors(torch.zeros(1, 50, device="meta"), [r]).device.type == "meta"
    assert counts.output_ids.device.type == counts.output_counts.device.type == "meta"


def test_processors_match_reference_per_row_in_a_mixed_batch():
    vocab = 40
    logits = random_logits(5, vocab, seed=1)
    rows = [
        row(prompt=[1, 2, 3, 3], output=[3, 5, 5, 5], repetition_penalty=1.3, temperature=0.0),
        row(output=[7, 8, 7], presence_penalty=0.7, frequency_penalty=-0.4, temperature=0.5),
        row(prompt=[9], output=[10], logit_bias={0: 5.0, 39: -3.5, 999: 1.0}, temperature=2.0),  # 999: out of range
        row(output=[11], stop_ids=[2, 4], min_tokens=3, repetition_penalty=0.8),
        row(output=[1, 2], temperature=1.0),  # nothing to do
    ]
    before = logits.clone()
    out = apply_processors(logits, rows)
    assert torch.equal(logits, before)  # never in place
    for i, r in enumerate(rows):
        assert out[i].tolist() == pytest.approx(reference_processors(logits[i].tolist(), r), rel=1e-6), i
    assert torch.equal(out[4], logits[4])


def test_processors_without_work_return_the_input():
    logits = random_logits(2, 10, seed=2)
    assert apply_processors(logits, [row(), row(temperature=0.0, top_k=3, top_p=0.5)]) is logits


def test_logit_bias_forces_and_bans_tokens():
    logits = random_logits(1, 50, seed=3).repeat(50, 1)
    best = int(logits[0].argmax())
    sampler = Sampler()
    forced = sampler(logits, [row(logit_bias={7: 100.0}, generator=make_generator(i, 0)) for i in range(50)])
    assert {s.token_id for s in forced} == {7}
    banned = sampler(logits[:1], [row(temperature=0.0, logit_bias={best: -100.0})])
    assert banned[0].token_id != best


def test_min_tokens_blocks_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0]])  # 3 (a stop id) is the clear favourite
    sampler = Sampler()
    assert sampler(logits, [row(output=[1], stop_ids=[3], min_tokens=2, temperature=0.0)])[0].token_id == 2
    assert sampler(logits, [row(output=[1, 1], stop_ids=[3], min_tokens=2, temperature=0.0)])[0].token_id == 3
    sampled = sampler(logits.repeat(200, 1), [row(output=[1], stop_ids=[3], min_tokens=2) for _ in range(200)])
    assert 3 not in {s.token_id for s in sampled}


def test_temperature_scales_sampled_rows_only():
    logits = torch.tensor([[1.0, -2.0, 4.0]] * 2)
    out = apply_processors(logits, [row(temperature=0.5), row(temperature=0.0, logit_bias={0: 0.0})])
    assert out[0].tolist() == pytest.approx([2.0, -4.0, 8.0])
    assert out[1].tolist() == pytest.approx([1.0, -2.0, 4.0])


def test_a_tiny_temperature_samples_like_greedy_with_finite_logprobs():
    logits = random_logits(4, 100, seed=7)
    for t in (1e-45, 1e-40, 1e-8):
        rows = [row(temperature=t, logprobs=2, generator=make_generator(i, 0)) for i in range(4)]
        out = Sampler()(logits, rows)
        assert [s.token_id for s in out] == logits.argmax(-1).tolist()
        assert all(math.isfinite(s.logprob.logprob) for s in out)


# --- seeds and distribution ------------------------------------------------------------------------


def test_make_generator():
    assert make_generator(None, 0) is None

    def draws(seed, index):
        return torch.rand(8, generator=make_generator(seed, index)).tolist()

    assert draws(5, 0) == draws(5, 0)
    assert draws(5, 0) != draws(5, 1)
    assert draws(5, 1) != draws(6, 0)
    assert draws(-1, 0) == draws(-1, 0)  # negative seeds are fine
    # a CPU generator keeps 32 bits of its seed: seeds that differ only above them still differ
    high = [5 + 2**32, 5 + 2**40, 5 - 2**63, 5 + 2**63 - 2**32, -(2**63)]
    assert len({tuple(draws(s, 0)) for s in [5, *high]}) == 1 + len(high)


def run_seeded(seed: int, logits: torch.Tensor, others: list[SampleRow], position: int, steps: int = 30) -> list[int]:
    """`steps` tokens of a seeded row (index 0 of a request) in a batch with `others`."""
    target = row(generator=make_generator(seed, 0), temperature=0.9, top_p=0.95)
    rows = others[:position] + [target] + others[position:]
    batch = logits.repeat(len(rows), 1)
    sampler = Sampler()
    return [sampler(batch, rows)[position].token_id for _ in range(steps)]


def test_seeded_row_is_reproducible_whatever_else_is_in_the_batch():
    logits = random_logits(1, 64, seed=4) * 0.3  # flat enough to vary
    alone = run_seeded(42, logits, [], 0)
    with_unseeded = run_seeded(42, logits, [row(), row(temperature=0.0), row(top_k=5)], 2)
    with_seeded = run_seeded(42, logits, [row(generator=make_generator(7, 0)), row(generator=make_generator(42, 1))], 1)
    assert alone == with_unseeded == with_seeded
    assert len(set(alone)) > 5  # really sampling
    assert run_seeded(43, logits, [], 0) != alone


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


def test_temperature_sampling_follows_softmax():
    # Seeded, so deterministic; the bound is loose (chi-square, 4 dof: p = 1e-6 at ~33.4) and a
    # sampler following the wrong temperature lands far above it.
    raw = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.5]])
    temperature, n = 0.7, 20000
    generator = make_generator(1234, 0)
    out = Sampler()(raw.repeat(n, 1), [row(temperature=temperature, generator=generator) for _ in range(n)])
    counts = torch.bincount(torch.tensor([s.token_id for s in out]), minlength=5).tolist()
    assert chi_square(counts, (raw[0] / temperature).softmax(-1).tolist()) < 33.4
    assert chi_square(counts, raw[0].softmax(-1).tolist()) > 200


def test_unseeded_rows_sample_from_the_global_rng():
    logits = log_probs(0.25, 0.25, 0.25, 0.25).repeat(2000, 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = [s.token_id for s in Sampler()(logits, [row() for _ in range(2000)])]
        torch.manual_seed(0)
        again = [s.token_id for s in Sampler()(logits, [row() for _ in range(2000)])]
    assert first == again
    counts = torch.bincount(torch.tensor(first), minlength=4).tolist()
    assert chi_square(counts, [0.25] * 4) < 30


# --- logprobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_log_softmax_of_the_models_own_logits(k):
    vocab = 30
    logits = random_logits(3, vocab, seed=5)
    rows = [
        row(output=[1, 1, 2], logprobs=k, temperature=0.0, presence_penalty=1.0),
        row(logprobs=k, temperature=0.7, top_k=4, logit_bias={3: 2.0}, generator=make_generator(0, 0)),
        row(temperature=0.0),  # no logprobs asked
    ]
    out = Sampler()(logits, rows)
    # vLLM's default raw_logprobs: the model's own distribution, whatever the temperature, penalty, bias or top-k
    expected = logits.log_softmax(-1)
    assert not torch.allclose(expected, apply_processors(logits, rows).log_softmax(-1))
    assert out[2].logprob is None
    for i in range(2):
        lp = out[i].logprob
        assert lp.token_id == out[i].token_id
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == k
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in lp.top] == expected[i].topk(k).indices.tolist()
        for t, v in lp.top:
            assert v == pytest.approx(expected[i, t].item(), abs=1e-5)



def test_logprobs_are_before_truncation():
    # top_k=1 makes the draw certain, but the reported logprob is that of the untruncated distribution
    logits = log_probs(0.6, 0.3, 0.1)
    out = Sampler()(logits, [row(top_k=1, logprobs=2, generator=make_generator(0, 0))])[0]
    assert out.token_id == 0
    assert out.logprob.logprob == pytest.approx(math.log(0.6), abs=1e-6)
    assert out.logprob.top[1] == (1, pytest.approx(math.log(0.3), abs=1e-6))


def test_row_count_mismatch_is_an_error():
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 5), [row()])


# --- on the GPU ----------------------------------------------------------------------------------


@pytest.mark.cuda
def test_sampling_on_the_gpu_equals_sampling_on_the_cpu():
    """The runner leaves logits on its device and the sampler works there: greedy, penalties, bias,
    min_tokens, temperature, top-k/p, min-p, logprobs and seeded draws give the same tokens and
    logprobs as on the CPU (a seeded row's noise comes from its CPU generator on either device)."""
    logits = random_logits(7, 1000, seed=3)

    def rows():
        return [
            row(temperature=0.0),
            row(temperature=0.0, output=[5, 5, 9], repetition_penalty=1.3, presence_penalty=0.5,
                frequency_penalty=0.2, logit_bias={"7": 4.0}, logprobs=3),
            row(temperature=0.8, top_k=50, top_p=0.9, generator=make_generator(11, 0), logprobs=0),
            row(temperature=1.2, min_p=0.05, generator=make_generator(11, 1)),
            row(temperature=0.7, output=[1], min_tokens=4, stop_ids=[int(logits[4].argmax())],
                generator=make_generator(12, 0)),
            row(temperature=0.0, logprobs=5),
            row(temperature=0.0, prompt=[3, 4, 4], repetition_penalty=1.5, presence_penalty=0.4),  # no output yet
        ]

    on_cpu = Sampler()(logits, rows())
    on_gpu = Sampler()(logits.cuda(), rows())
    assert [s.token_id for s in on_gpu] == [s.token_id for s in on_cpu]
    for g, c in zip(on_gpu, on_cpu):
        assert (g.logprob is None) == (c.logprob is None)
        if c.logprob is not None:
            assert [t for t, _ in g.logprob.top] == [t for t, _ in c.logprob.top]
            assert [v for _, v in g.logprob.top] == pytest.approx([v for _, v in c.logprob.top], abs=1e-4)
            assert g.logprob.logprob == pytest.approx(c.logprob.logprob, abs=1e-4)


def test_allowed_token_ids_and_bad_words_rule_tokens_out():
    """vLLM's allowed_token_ids (only these) and bad_words (a word's last token, where the output ends
    with the rest of it), for greedy and sampled rows alike."""
    logits = torch.zeros(1, 10)
    logits[0, 7] = 5.0  # the model's favourite
    for temperature in (0.0, 1.0):
        for seed in range(5):
            only = row(temperature=temperature, allowed_token_ids=[2, 3],
                       generator=make_generator(seed, 0) if temperature else None)
            assert Sampler()(logits, [only])[0].token_id in (2, 3)
    logits[0, 5] = 4.0
    banned = dict(temperature=0.0, bad_words_token_ids=[[7], [4, 5]])
    assert Sampler()(logits, [row(**banned)])[0].token_id == 5  # 7 banned; 5 only right after a 4
    assert Sampler()(logits, [row(output=[1, 4], **banned)])[0].token_id not in (7, 5)
    assert Sampler()(logits, [row(output=[4, 1], **banned)])[0].token_id == 5

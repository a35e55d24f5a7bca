"""The native sampler against the exact filtered distribution, computed here in NumPy (float64, a full
stable sort) as the README defines it: repetition penalty -> temperature -> top-k -> top-p -> min-p."""

from __future__ import annotations

import numpy as np
import pytest

from ternlm import _core
from ternlm.sampling import SamplingParams, sample, sample_batch, token_logprobs

DRAWS = 20_000


def exact_distribution(logits: np.ndarray, params: SamplingParams, history: list[int]) -> np.ndarray:
    """The probability of every token after the filters."""
    x = logits.astype(np.float64)
    if params.repetition_penalty != 1.0:
        seen = np.unique(history[-params.repeat_last_n:])
        x[seen] = np.where(x[seen] > 0, x[seen] / params.repetition_penalty, x[seen] * params.repetition_penalty)
    x = (x - x.max()) / params.temperature
    order = np.argsort(-x, kind="stable")  # most likely first, ties by id
    if params.top_k:
        order = order[:params.top_k]
    p = np.exp(x[order])
    p /= p.sum()
    if params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1  # the shortest prefix reaching top_p
        order, p = order[:keep], p[:keep]
    keep = p >= params.min_p * p[0]
    distribution = np.zeros(len(logits))
    distribution[order[keep]] = p[keep] / p[keep].sum()
    return distribution


def chi_square_critical(dof: int, z: float = 3.719) -> float:
    """The chi-square quantile at one-sided normal score z (3.719: p = 1e-4), by Wilson-Hilferty."""
    return dof * (1 - 2 / (9 * dof) + z * np.sqrt(2 / (9 * dof))) ** 3


def assert_draws_follow(tokens: np.ndarray, expected: np.ndarray) -> None:
    counts = np.bincount(tokens, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, f"drew tokens of probability 0: {np.flatnonzero(counts * (expected == 0))}"
    expected_counts = expected * len(tokens)
    big = expected_counts >= 5  # the rest pooled into one cell
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected_counts[big], expected_counts[~big].sum())
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    statistic = float(((observed - wanted) ** 2 / wanted).sum())
    assert statistic < chi_square_critical(len(wanted) - 1), (statistic, len(wanted) - 1)


def example_logits(vocab: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    logits[rng.choice(vocab, 200, replace=False)] = logits[7]  # ties, which rank by id
    logits[rng.choice(vocab, 300, replace=False)] = -np.inf    # masked tokens
    return logits


HISTORY = [7, 7, 3, 11, 2500, 40, 41, 42]
COMBINATIONS = {
    "temperature only": dict(temperature=0.8),
    "top-k 40": dict(temperature=0.8, top_k=40),
    "top-p 0.95": dict(temperature=0.8, top_p=0.95),
    "top-p 0.5": dict(temperature=1.3, top_p=0.5),
    "min-p 0.05": dict(temperature=0.8, min_p=0.05),
    "top-p 0.9 then min-p 0.02": dict(temperature=1.0, top_p=0.9, min_p=0.02),
    # a draw lands in this nucleus about once in ten: after eight misses the histogram finds it
    "top-p 0.1, hot": dict(temperature=3.0, top_p=0.1),
    "top-k 200 then top-p 0.9": dict(temperature=1.0, top_k=200, top_p=0.9),
    "all with a repetition penalty": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.3),
    "penalty, hot, top-p": dict(temperature=2.0, top_p=0.9, repetition_penalty=0.5),
}


def draw_many(logits: np.ndarray, params: SamplingParams, history: list[int], seed: int = 1,
              draws: int = DRAWS) -> np.ndarray:
    """Draws in batches of rows with the same logits, all taking their numbers from one generator."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(draws, (16 << 20) // (4 * len(logits))))
    batch = np.broadcast_to(logits, (rows, len(logits)))
    tokens = []
    while len(tokens) < draws:
        tokens += sample_batch(batch, [params] * rows, [rng] * rows, [history] * rows)
    return np.array(tokens[:draws])


@pytest.mark.parametrize("name", COMBINATIONS)
def test_draws_follow_the_exact_filtered_distribution(name):
    logits = example_logits()
    params = SamplingParams(**COMBINATIONS[name])
    assert_draws_follow(draw_many(logits, params, HISTORY), exact_distribution(logits, params, HISTORY))


def test_a_flat_vocabulary_sized_distribution():
    """128,256 logits close together: the nucleus holds most of the vocabulary (top-p 0.95: a draw
    lands in it nineteen times in twenty), or (top-p 0.05) a few dozen tokens that eight draws miss
    two times in three, so that the histogram finds it."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(128_256) * 0.3).astype(np.float32)
    logits[:64] += 4  # 64 likely tokens: enough draws land on each for the test to see
    for params in [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams(temperature=0.8, top_p=0.05),
                   SamplingParams(temperature=0.8, top_k=5000)]:
        expected = exact_distribution(logits, params, [])
        tokens = draw_many(logits, params, [], seed=3, draws=4000)
        assert_draws_follow(tokens, expected)


def test_masked_tokens_are_never_drawn():
    """Constrained decoding sets the logits of disallowed tokens to -inf: probability 0 under every
    filter, even penalized; greedy takes the best finite logit."""
    rng = np.random.default_rng(4)
    logits = np.full(5000, -np.inf, dtype=np.float32)
    allowed = np.array([3, 17, 4000, 4999])
    logits[allowed] = [-50.0, -49.0, -52.0, -51.0]  # far below 0: a naive max over zeros would go wrong
    for kwargs in [*COMBINATIONS.values(), dict(temperature=1e-30), dict(temperature=50.0, top_k=4500)]:
        params = SamplingParams(**kwargs)
        tokens = {sample(logits, params, rng, [0, 1, 3, 17]) for _ in range(300)}
        assert tokens <= set(allowed.tolist()), kwargs
    assert sample(logits, SamplingParams(), rng, []) == 17
    assert sample(logits, SamplingParams(repetition_penalty=2.0), rng, [17]) == 3  # -49 * 2 < -50
    one = np.full(10, -np.inf, dtype=np.float32)
    one[9] = 1.0
    assert {sample(one, SamplingParams(temperature=5.0, top_p=0.1, min_p=0.9), rng, []) for _ in range(20)} == {9}


@pytest.mark.parametrize("bad, message", [(np.nan, "NaN"), (np.inf, r"\+inf")])
def test_invalid_logits_are_a_clear_error(bad, message):
    logits = np.zeros(100, dtype=np.float32)
    logits[50] = bad
    for params in [SamplingParams(), SamplingParams(temperature=1.0, top_k=5)]:
        with pytest.raises(ValueError, match=message):
            sample(logits, params, np.random.default_rng(0), [])
    with pytest.raises(ValueError, match="every logit is -inf"):
        sample(np.full(100, -np.inf, dtype=np.float32), SamplingParams(temperature=1.0), np.random.default_rng(0), [])


def test_bad_settings_and_ids_are_clear_errors():
    with pytest.raises(ValueError, match="top_p"):
        _core.SamplingSettings(temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sample(np.zeros(10, np.float32), SamplingParams(repetition_penalty=1.2), np.random.default_rng(0), [10])


def test_greedy_takes_the_first_of_the_best():
    logits = np.array([1.0, 3.0, -2.0, 3.0], dtype=np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0), []) == 1
    assert sample(logits, SamplingParams(repetition_penalty=2.0), np.random.default_rng(0), [1]) == 3


def test_a_batch_draws_what_each_row_draws_alone():
    """Each row has its own generator: its tokens do not depend on the other rows of the batch."""
    logits = np.stack([example_logits(seed=s) for s in range(5)])
    params = [SamplingParams(**kwargs) for kwargs in list(COMBINATIONS.values())[:5]]
    alone = [[sample(row, p, rng, HISTORY) for _ in range(30)]
             for row, p, rng in zip(logits, params, [np.random.default_rng(s) for s in range(5)])]
    rngs = [np.random.default_rng(s) for s in range(5)]
    together = [sample_batch(logits, params, rngs, [HISTORY] * 5) for _ in range(30)]
    assert np.array(together).T.tolist() == alone
    reversed_rngs = [np.random.default_rng(s) for s in reversed(range(5))]
    reversed_batch = [sample_batch(logits[::-1], params[::-1], reversed_rngs, [HISTORY] * 5) for _ in range(30)]
    assert np.array(reversed_batch).T.tolist()[::-1] == alone


def test_tempering_variants_agree_bit_for_bit_and_with_numpy():
    rng = np.random.default_rng(5)
    logits = np.concatenate([rng.standard_normal(5000) * 30, [-np.inf, 0.0, -1e-30]]).astype(np.float32)
    top = logits.max()
    results = {k: _core.kernels.temper(logits, top, 1.7, k) for k in _core.available_kernels()}
    distance, weight = results["scalar"]
    for kernel, (d, w) in results.items():
        assert np.array_equal(d, distance) and np.array_equal(w, weight), kernel
    np.testing.assert_array_equal(distance, (top - logits) * np.float32(1.7))
    exact = np.exp(-distance.astype(np.float64))
    exact[distance > 87] = 0  # weights below e^-87 count as 0
    np.testing.assert_allclose(weight, exact, rtol=5e-7, atol=0)


def test_token_logprobs_match_a_float64_log_softmax():
    rng = np.random.default_rng(6)
    logits = (rng.standard_normal(128_256) * 3).astype(np.float32)
    logits[[10, 20]] = logits.max() + 1  # a tie for the best, ordered by id
    exact = logits.astype(np.float64) - logits.max()
    exact -= np.log(np.exp(exact).sum())
    logprob, top = token_logprobs(logits, 1234, 5)
    assert logprob == pytest.approx(exact[1234], abs=1e-4)
    best = np.argsort(-exact, kind="stable")[:5]
    assert [i for i, _ in top] == best.tolist()
    assert [lp for _, lp in top] == pytest.approx(exact[best].tolist(), abs=1e-4)
    assert token_logprobs(logits, 0, 0)[1] == []


def test_a_top_k_past_every_integer_type_keeps_every_token():
    """top_k 2**65 (the server accepts any integer) is top_k off: the same draws as top_k 0."""
    logits = np.linspace(-3.0, 3.0, 50, dtype=np.float32)
    huge = [sample(logits, SamplingParams(temperature=1.0, top_k=2**65), np.random.default_rng(s), []) for s in range(20)]
    off = [sample(logits, SamplingParams(temperature=1.0, top_k=0), np.random.default_rng(s), []) for s in range(20)]
    assert huge == off

"""Per-row sampling settings as data (``RowSampling``), min-p, the penalties, log-probabilities and stop strings,
against the samplers they must equal and against numpy. Tokens drawn from the very same logits are compared
exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssdkit import Greedy, Sample, make_sampler
from ssdkit.inference.sampling import Penalties, RowSampling, penalize, sample_rows, top_logprobs
from ssdkit.inference.stops import StopStrings

VOCAB = 300


def _logits(seed=1, rows=6):
    return jax.random.normal(jax.random.key(seed), (rows, VOCAB)) * 3


def test_rows_draw_what_each_sampler_draws_alone():
    """Row b of ``sample_rows`` is ``sampler_b(logits[b:b+1], fold_in(key(seed_b), step_b))``, for greedy, plain
    temperature, top-k, top-p, both, and min-p rows side by side, at different steps."""
    samplers = [Greedy(), Sample(0.7), Sample(1.0, top_k=5), Sample(1.3, top_p=0.8),
                Sample(0.9, top_k=40, top_p=0.9, min_p=0.05), Sample(1.0, min_p=0.2)]
    logits = _logits()
    rows = RowSampling.of([(s, Penalties(), 10 + i) for i, s in enumerate(samplers)])
    draw = jax.jit(sample_rows)
    for step in range(4):
        steps = jnp.arange(6, dtype=jnp.int32) + step
        got = np.asarray(draw(logits, rows, steps))
        want = [int(s(logits[i:i + 1], jax.random.fold_in(jax.random.key(10 + i), step + i))[0])
                for i, s in enumerate(samplers)]
        assert got.tolist() == want
    all_greedy = RowSampling.of([(Greedy(), Penalties(), 0)] * 6)
    assert np.asarray(draw(logits, all_greedy, jnp.zeros(6, jnp.int32))).tolist() == np.argmax(logits, -1).tolist()


def test_min_p_keeps_the_tokens_within_a_factor_of_the_most_likely():
    logits = _logits(2, 3)
    kept = np.isfinite(np.asarray(Sample(0.5, min_p=0.1).filtered_logits(logits)))
    p = np.asarray(jax.nn.softmax(logits / 0.5, axis=-1), np.float64)
    np.testing.assert_array_equal(kept, p >= 0.1 * p.max(-1, keepdims=True))
    assert make_sampler(0.0, min_p=0.5) == Greedy()
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="min_p"):
            make_sampler(1.0, min_p=bad)


def test_penalties_follow_their_formulas():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 20)).astype(np.float32) * 2
    counts = rng.integers(0, 3, (3, 20)).astype(np.int32)
    prompt = rng.random((3, 20)) < 0.2
    rep, pres, freq = np.array([1.0, 1.3, 2.0]), np.array([0.0, 0.5, -0.4]), np.array([0.0, 0.2, 1.0])
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = np.asarray(penalize(jnp.asarray(logits), jnp.asarray(counts), jnp.asarray(prompt), f32(rep), f32(pres),
                              f32(freq)))
    seen = prompt | (counts > 0)
    want = np.where(seen, np.where(logits > 0, logits / rep[:, None], logits * rep[:, None]), logits)
    want = want - freq[:, None] * counts - pres[:, None] * (counts > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[0], logits[0])  # no penalty: unchanged
    for bad in (dict(repetition=0.0), dict(presence=float("inf")), dict(frequency="1")):
        with pytest.raises(ValueError, match="penalty"):
            Penalties(**bad)


def test_top_logprobs_are_the_log_softmax():
    logits = _logits(3, 2)
    token = jnp.asarray([5, 7], jnp.int32)
    lp = top_logprobs(logits, token, 3)
    ref = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits, -1))
    np.testing.assert_allclose(np.asarray(lp.logprob), ref[[0, 1], [5, 7]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(lp.top_ids), np.argsort(-ref, -1)[:, :3])
    np.testing.assert_allclose(np.asarray(lp.top_logprobs), -np.sort(-ref, -1)[:, :3], rtol=1e-6)


@given(
    text=st.text(alphabet="ab\n", max_size=30),
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=8),
)
def test_stop_strings_show_exactly_the_text_before_the_first_stop(text, stops, cuts):
    """However the text arrives in pieces, what is shown is the text up to the earliest stop string (all of it,
    after ``flush``, when none occurs), and the match is reported on the piece that completes it."""
    matcher = StopStrings(stops)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    shown, stopped = "", False
    for a, b in zip(bounds, bounds[1:], strict=False):
        piece, stopped = matcher.push(text[a:b])
        shown += piece
        if stopped:
            break
    if not stopped:
        shown += matcher.flush()
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert stopped == bool(ends)
    assert shown == (text[:min(ends)] if ends else text)


def test_stop_strings_refuse_empty_ones():
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(["a", ""])

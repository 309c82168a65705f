"""The compiled generation loop and the samplers against a plain Python loop, on a tiny toy model.

The compiled loop, the stream and the Python loop are different programs, so their logits agree only to
rounding and their token ids are compared with ``assert_same_greedy_tokens``: equal up to a row's first
near tie (a decision margin below ``tie``). Token ids drawn from the very same logits (the samplers
against each other, against numpy) are compared exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax import lax

from ssdkit import (
    GenerationResult,
    Greedy,
    LanguageModel,
    Penalties,
    Sample,
    Speculative,
    generate,
    generate_stream,
    make_sampler,
)
from ssdkit.inference.loop import _generate, _generation_loop
from ssdkit.inference.sampling import argmax_last, penalize
from tests.helpers import assert_same_greedy_tokens, count_jaxpr_eqns, greedy_margins

# No numerics mark (README's AVX2 rerun): token ids from different programs are compared up to near ties
# (assert_same_greedy_tokens), and exactly only where they come from the very same logits or program.

VOCAB, DIM = 32, 16


@dataclasses.dataclass(frozen=True)
class TanhLM:
    """h' = tanh(0.9 h + emb[token] @ W), logits = h' @ head; the cache is h (batch, dim) float32."""

    vocab: int = VOCAB
    dim: int = DIM

    def init(self, seed: int):
        """Gaussian weights from numpy (jax.random would compile its generator for each shape at import)."""
        rng = np.random.default_rng(seed)
        emb = rng.standard_normal((self.vocab, self.dim))
        w = rng.standard_normal((self.dim, self.dim)) / np.sqrt(self.dim)
        head = rng.standard_normal((self.dim, self.vocab)) * 2.0
        return tuple(jnp.asarray(a, jnp.float32) for a in (emb, w, head))

    def _update(self, params, h, token):
        emb, w, _ = params
        return jnp.tanh(0.9 * h + emb[token] @ w)

    def prefill(self, params, tokens, lengths=None):
        batch, seq = tokens.shape

        def step(h, xs):
            t, token = xs
            new = self._update(params, h, token)
            if lengths is not None:  # rows stop updating after their last prompt token
                new = jnp.where((t < lengths)[:, None], new, h)
            return new, None

        h, _ = lax.scan(step, jnp.zeros((batch, self.dim), jnp.float32), (jnp.arange(seq), tokens.T))
        return h @ params[2], h

    def decode(self, params, token, cache):
        h = self._update(params, cache, token)
        return h @ params[2], h


@dataclasses.dataclass(frozen=True)
class UnpaddedLM(TanhLM):
    """A model whose prefill takes no lengths at all."""

    def prefill(self, params, tokens):
        return super().prefill(params, tokens)


@dataclasses.dataclass(frozen=True)
class CountingLM(TanhLM):
    """TanhLM whose cache also counts decode calls: cache = (h, count)."""

    def prefill(self, params, tokens, lengths=None):
        logits, h = super().prefill(params, tokens, lengths)
        return logits, (h, jnp.int32(0))

    def decode(self, params, token, cache):
        logits, h = super().decode(params, token, cache[0])
        return logits, (h, cache[1] + 1)


MODEL: LanguageModel = TanhLM()
PARAMS = MODEL.init(19)  # a seed whose decisions here are all far from ties (see ULPS)


# The toy's logits (|logits| <= ~20) come from a 16-term dot product after a tanh recurrence that contracts
# by 0.9 a step, so two programs' logits stay within ~10x one step's rounding: measured 0 on one machine
# and ~0.5 ulps of max|logits| between AVX-512 and SSE4.2 builds. 64 ulps (~1e-4) bounds each side; a
# decision margin below twice that is a near tie. The smallest margin of the loops compared here is over
# 10x that bound (PARAMS' seed was chosen for it), so every token is compared.
ULPS = 64


def decision_margins(sampler, logits, key):
    """(batch,) how far ``sampler``'s choice from ``logits`` is from flipping, the scores' magnitude, and
    the (batch,) choice this analysis predicts.

    Greedy: the top-1 minus top-2 logit. Sample takes argmax(logits / T + Gumbel noise) over the tokens
    the top-k and top-p cuts keep: the margin is the smallest of that top-2 gap, the gap at each cut
    (between the last kept and the first dropped logit) and the distance of the mass before each token
    from top_p (when logits move by d, probability masses move by at most 2d, as a top-2 gap does).
    """
    z = np.asarray(logits, np.float64)
    if isinstance(sampler, Greedy):
        return greedy_margins(z), np.abs(z).max(), np.argmax(z, axis=-1)
    z, gaps, rows = z / sampler.temperature, [], np.arange(z.shape[0])
    if sampler.top_k is not None and sampler.top_k < z.shape[-1]:
        desc = -np.sort(-z, axis=-1)
        gaps.append(desc[:, sampler.top_k - 1] - desc[:, sampler.top_k])
        z = np.where(z < desc[:, sampler.top_k - 1, None], -np.inf, z)
    if sampler.top_p is not None and sampler.top_p < 1.0:
        desc = np.concatenate([-np.sort(-z, axis=-1), np.full((len(z), 1), -np.inf)], axis=-1)  # -inf: none left
        probs = np.exp(desc - desc[:, :1])
        probs /= probs.sum(axis=-1, keepdims=True)
        before = np.cumsum(probs, axis=-1) - probs
        kept = np.sum(before < sampler.top_p, axis=-1)
        gaps += [np.abs(before - sampler.top_p).min(axis=-1), desc[rows, kept - 1] - desc[rows, kept]]
        z = np.where(z < desc[rows, kept - 1, None], -np.inf, z)
    scores = z + np.asarray(jax.random.gumbel(key, z.shape, jnp.float32), np.float64)
    gaps.append(greedy_margins(scores))
    return np.min(gaps, axis=0), np.abs(scores[np.isfinite(scores)]).max(), np.argmax(scores, axis=-1)


class Reference(NamedTuple):
    tokens: np.ndarray  # (batch, steps) the Python loop's tokens
    margins: np.ndarray  # (batch, steps) how far each choice was from flipping (decision_margins)
    tie: float  # a smaller margin is a near tie: another program may choose differently there


@functools.cache
def _jitted(model):
    """The model's prefill and decode, each jitted once per model (the Python loop's programs)."""
    return jax.jit(model.prefill), jax.jit(model.decode)


def python_loop(model, params, prompt, max_new_tokens, sampler, key=None, eos=None, pad=0, lengths=None,
                penalties=None):
    """Reference: prefill, then decode + sample one token at a time on the host; with ``penalties``, each
    token from ``penalize``'s logits over the counts and prompt tokens kept here in numpy."""
    prefill, decode = _jitted(model)
    logits, cache = prefill(params, prompt) if lengths is None else prefill(params, prompt, lengths=lengths)
    batch, rows = prompt.shape[0], np.arange(prompt.shape[0])
    out, margins, agree, done = [], [], [], np.zeros(batch, bool)
    token, scale = None, 0.0
    counts = np.zeros(logits.shape, np.int32)
    seen_in_prompt = np.zeros(logits.shape, bool)
    for b, n in enumerate(np.broadcast_to(prompt.shape[1] if lengths is None else lengths, (batch,))):
        seen_in_prompt[b, np.asarray(prompt)[b, :n]] = True
    for i in range(max_new_tokens):
        if i:
            logits, cache = decode(params, token, cache)
        if penalties is not None:
            logits = jax.jit(penalize)(logits, counts, seen_in_prompt,
                                       *(np.full(batch, v, np.float32) for v in dataclasses.astuple(penalties)))
        step_key = None if key is None else jax.random.fold_in(key, i)
        token = sampler(logits, step_key)
        host = np.asarray(token)
        counts[rows[~done], host[~done]] += 1
        margin, magnitude, choice = decision_margins(sampler, logits, step_key)
        margins.append(margin)
        agree.append(choice == host)
        scale = max(scale, magnitude)
        out.append(np.where(done, pad, host))
        if eos is not None:
            done |= host == eos
    tie = 2 * ULPS * float(np.finfo(np.float32).eps) * scale  # twice the rounding bound of each side
    margins = np.stack(margins, axis=1)
    # The margins describe the sampler's actual decisions (a near tie may round either way in float64).
    assert np.all(np.stack(agree, axis=1) | (margins <= tie)), "decision_margins disagrees with the sampler"
    return Reference(np.stack(out, axis=1), margins, tie)


def _prompt(batch=3, seq=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)), jnp.int32)


def _first(row, token):
    hits = np.flatnonzero(np.asarray(row) == token)
    return int(hits[0]) if hits.size else None


# ------------------------------------------------------------------------------ against the Python loop
def test_greedy_matches_python_loop():
    prompt = _prompt()
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=20)
    assert isinstance(res, GenerationResult)
    chex.assert_shape(res.tokens, (3, 20))
    chex.assert_type([res.tokens, res.lengths], jnp.int32)
    ref = python_loop(MODEL, PARAMS, prompt, 20, Greedy())
    assert_same_greedy_tokens(res.tokens, ref.tokens, ref.margins, tie=ref.tie)
    np.testing.assert_array_equal(res.lengths, [20, 20, 20])  # no EOS: a count, whatever the tokens
    assert len(set(map(tuple, np.asarray(res.tokens).tolist()))) > 1  # rows differ: a real batch test


@pytest.mark.parametrize(
    "sampler",
    [Sample(0.7), pytest.param(Sample(1.3, top_k=5), marks=pytest.mark.long),
     pytest.param(Sample(1.0, top_p=0.8), marks=pytest.mark.long), Sample(0.9, top_k=10, top_p=0.6)],
    ids=str,
)  # each cut alone: -m long (the last case applies both; the samplers' own tests check each cut)
def test_sampling_matches_python_loop(sampler):
    key = jax.random.key(42)
    prompt = _prompt()
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=15, sampler=sampler, key=key)
    ref = python_loop(MODEL, PARAMS, prompt, 15, sampler, key)
    assert_same_greedy_tokens(res.tokens, ref.tokens, ref.margins, tie=ref.tie)
    other = generate(MODEL, PARAMS, prompt, max_new_tokens=15, sampler=sampler, key=jax.random.key(43))
    assert not np.array_equal(res.tokens, other.tokens)  # the key matters


def _eos_case(max_new=12):
    """A prompt whose greedy row 0 emits a token at step 3 that row 0 has not emitted before and row 1
    never emits, with no near tie anywhere: every program computing these logits to within rounding
    picks these very tokens, so tests may rely on where the EOS lands."""
    for seed in range(50):
        prompt = _prompt(batch=2, seed=seed)
        ref = python_loop(MODEL, PARAMS, prompt, max_new, Greedy())
        eos = int(ref.tokens[0, 3])
        if _first(ref.tokens[0], eos) == 3 and _first(ref.tokens[1], eos) is None and ref.margins.min() > ref.tie:
            return prompt, ref, eos
    raise AssertionError("no prompt seed gives a row-0-only EOS at step 3")


def test_eos_stops_one_row_and_pads_it():
    prompt, ref, eos = _eos_case()
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=-1)
    row0 = np.concatenate([ref.tokens[0, :4], np.full(8, -1)])  # row 0 stops after its EOS at step 3
    assert_same_greedy_tokens(res.tokens, np.stack([row0, ref.tokens[1]]), ref.margins, tie=ref.tie)
    # _eos_case has no near tie, so the tokens agree exactly, and so do the lengths.
    np.testing.assert_array_equal(res.lengths, [4, 12])


def test_loop_stops_when_every_row_is_done():
    model = CountingLM()
    loop = jax.jit(
        _generation_loop, static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id")
    )
    run = functools.partial(loop, model, PARAMS, lengths=None, key=None, max_new_tokens=30, sampler=Greedy(),
                            pad_token_id=0)
    for seed in range(50):
        prompt = _prompt(batch=2, seed=seed)
        run_ref = python_loop(MODEL, PARAMS, prompt, 30, Greedy())
        if run_ref.margins.min() <= run_ref.tie:
            continue  # a near tie could let the compiled loop take another path; the counts below need none
        ref = run_ref.tokens
        both = [t for t in set(ref[0, :10].tolist()) if _first(ref[1, :10], t) is not None]
        stops = [(max(_first(ref[0], t), _first(ref[1], t)), t) for t in both]
        stops = [(s, t) for s, t in stops if s >= 2 and _first(ref[0], t) != _first(ref[1], t)]
        if stops:
            break
    else:
        raise AssertionError("no prompt seed gives both rows a common token at different steps")
    last, eos = min(stops)
    final = run(prompt, eos_token_id=eos)
    np.testing.assert_array_equal(final.lengths, [_first(ref[0], eos) + 1, _first(ref[1], eos) + 1])
    assert int(final.step) == last + 1  # tokens written
    assert int(final.cache[1]) == last  # one decode per token after the first, none wasted
    assert (np.asarray(final.tokens[:, last + 1:]) == 0).all()  # the pad id, never overwritten
    # Without EOS the loop runs to the budget, still without a decode after the last token.
    final = run(prompt, eos_token_id=None)
    assert int(final.step) == 30 and int(final.cache[1]) == 29


def test_max_new_tokens_one_runs_no_decode():
    res = generate(MODEL, PARAMS, _prompt(), max_new_tokens=1)
    ref = python_loop(MODEL, PARAMS, _prompt(), 1, Greedy())
    assert_same_greedy_tokens(res.tokens, ref.tokens, ref.margins, tie=ref.tie)
    np.testing.assert_array_equal(res.lengths, [1, 1, 1])  # a count, whatever the tokens


@pytest.mark.parametrize("penalties", [None, Penalties(1.2, 0.5, 0.1)], ids=str)
def test_traced_program_does_not_grow_with_max_new_tokens(penalties):
    def n_eqns(max_new):
        fn = functools.partial(_generation_loop, MODEL, max_new_tokens=max_new, sampler=Sample(0.8, 5, 0.9),
                               eos_token_id=3, pad_token_id=0, penalties=penalties)
        return count_jaxpr_eqns(jax.make_jaxpr(fn)(PARAMS, _prompt(), None, jax.random.key(0)).jaxpr)

    assert n_eqns(8) == n_eqns(256)


def test_repeated_calls_hit_the_jit_cache():
    model = TanhLM(dim=DIM, vocab=VOCAB)
    generate(model, PARAMS, _prompt(seed=1), max_new_tokens=5, eos_token_id=2)
    before = _generate._cache_size()
    params = jax.tree_util.tree_map(lambda a: a * 1.5, PARAMS)
    generate(TanhLM(), params, _prompt(seed=2), max_new_tokens=5, eos_token_id=2)  # an equal model object
    assert _generate._cache_size() == before


# ------------------------------------------------------------------------------ prompt lengths
def test_right_padded_prompts_match_each_row_alone():
    lengths = [7, 3, 5]
    prompt = _prompt(seed=3)  # positions past each row's length hold unrelated tokens
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=12, prompt_lengths=jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        alone = python_loop(MODEL, PARAMS, prompt[row:row + 1, :n], 12, Greedy())
        assert_same_greedy_tokens(res.tokens[row], alone.tokens, alone.margins, tie=alone.tie, name=f"row {row}")


def test_model_without_lengths_support():
    prompt = _prompt()
    res = generate(UnpaddedLM(), PARAMS, prompt, max_new_tokens=6)
    # Exact: UnpaddedLM traces to the very same computation as MODEL without lengths, hence the same program.
    np.testing.assert_array_equal(res.tokens, generate(MODEL, PARAMS, prompt, max_new_tokens=6).tokens)


# ------------------------------------------------------------------------------ penalties
PENALTIES = Penalties(repetition=1.5, presence=0.5, frequency=0.75)


@pytest.mark.parametrize("sampler", [Greedy(), Sample(0.8, top_k=7)], ids=str)
def test_penalties_match_python_loop(sampler):
    """Penalized generation (right-padded rows: padding is no prompt token) against a host loop applying
    ``penalize`` step by step; greedy also through the stream (the sampler is orthogonal to it), and the
    penalties change its tokens."""
    lengths, key = jnp.asarray([7, 3, 5]), jax.random.key(42)
    # test_right_padded_prompts_match_each_row_alone's shapes. Seed 22: the repetition penalty changes row
    # 0's token 0 (its prefill argmax is a prompt token); row 1's argmax is among its padding only.
    prompt = _prompt(seed=22)
    run = dict(max_new_tokens=12, sampler=sampler, key=key, prompt_lengths=lengths, penalties=PENALTIES)
    res = generate(MODEL, PARAMS, prompt, **run)
    ref = python_loop(MODEL, PARAMS, prompt, 12, sampler, key, lengths=lengths, penalties=PENALTIES)
    assert_same_greedy_tokens(res.tokens, ref.tokens, ref.margins, tie=ref.tie)
    if isinstance(sampler, Greedy):
        streamed = np.stack(list(generate_stream(MODEL, PARAMS, prompt, **run)), axis=1)
        assert_same_greedy_tokens(streamed, ref.tokens, ref.margins, tie=ref.tie)
        assert not np.array_equal(python_loop(MODEL, PARAMS, prompt, 12, sampler, lengths=lengths).tokens, ref.tokens)


def test_huge_presence_penalty_never_repeats_a_token():
    res = generate(MODEL, PARAMS, _prompt(), max_new_tokens=20, penalties=Penalties(presence=1e4))
    for row in np.asarray(res.tokens).tolist():
        assert len(set(row)) == len(row), row


def test_inactive_penalties_are_no_penalties():
    """``Penalties()`` is the program without penalties: the same jit cache entry, the very same tokens."""
    prompt, key = _prompt(), jax.random.key(1)
    plain = generate(MODEL, PARAMS, prompt, max_new_tokens=20)  # test_greedy_matches_python_loop's program
    before = _generate._cache_size()
    np.testing.assert_array_equal(generate(MODEL, PARAMS, prompt, max_new_tokens=20, penalties=Penalties()).tokens,
                                  plain.tokens)
    assert _generate._cache_size() == before
    fn = functools.partial(_generation_loop, MODEL, max_new_tokens=8, sampler=Sample(0.8), eos_token_id=3,
                           pad_token_id=0)
    assert str(jax.make_jaxpr(functools.partial(fn, penalties=Penalties(1.0, 0.0, -0.0)))(PARAMS, prompt, None, key)) \
        == str(jax.make_jaxpr(fn)(PARAMS, prompt, None, key))


def test_bad_penalties():
    prompt = _prompt()
    with pytest.raises(ValueError, match="cannot be combined with speculative decoding"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, speculative=Speculative(),
                 penalties=Penalties(presence=1.0))
    with pytest.raises(TypeError, match=r"penalties must be ssdkit\.Penalties.*got \{'presence': 1\.0\}"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, penalties={"presence": 1.0})
    with pytest.raises(TypeError, match="penalties must be"):
        generate_stream(MODEL, PARAMS, prompt, max_new_tokens=4, penalties=1.2)


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("sampler", [Greedy(), Sample(0.8, top_k=7)], ids=str)
def test_stream_matches_generate(sampler):
    prompt, _, eos = _eos_case()
    key = jax.random.key(5)
    ref = python_loop(MODEL, PARAMS, prompt, 12, sampler, key)  # the decisions' margins, whatever the EOS
    for eos_id in (None, eos):
        res = generate(MODEL, PARAMS, prompt, max_new_tokens=12, sampler=sampler, key=key, eos_token_id=eos_id)
        steps = list(generate_stream(MODEL, PARAMS, prompt, max_new_tokens=12, sampler=sampler, key=key,
                                     eos_token_id=eos_id))
        for t in steps:
            chex.assert_shape(t, (2,))
            chex.assert_type(t, jnp.int32)
        got = np.stack([np.asarray(t) for t in steps], axis=1)
        n = got.shape[1]
        assert_same_greedy_tokens(got, np.asarray(res.tokens)[:, :n], ref.margins[:, :n], tie=ref.tie)
        # The stream stops once every row has emitted EOS (judged by its own tokens: after a near tie they
        # may differ from the loop's).
        ends = [12 if eos_id is None or _first(row, eos_id) is None else _first(row, eos_id) + 1 for row in got]
        assert n == max(ends)


def test_stream_stops_early_when_every_row_is_done():
    prompt, ref, eos = _eos_case()
    steps = list(generate_stream(MODEL, PARAMS, prompt[:1], max_new_tokens=12, eos_token_id=eos))
    assert len(steps) == 4  # _eos_case has no near tie: the EOS lands at step 3 in every program
    assert_same_greedy_tokens(np.concatenate(steps), ref.tokens[0, :4], ref.margins[0, :4], tie=ref.tie)


def test_stream_with_prompt_lengths():
    lengths = jnp.asarray([7, 2, 4])
    res = generate(MODEL, PARAMS, _prompt(seed=4), max_new_tokens=6, prompt_lengths=lengths)
    got = np.stack(list(generate_stream(MODEL, PARAMS, _prompt(seed=4), max_new_tokens=6, prompt_lengths=lengths)),
                   axis=1)
    ref = python_loop(MODEL, PARAMS, _prompt(seed=4), 6, Greedy(), lengths=lengths)
    assert_same_greedy_tokens(got, res.tokens, ref.margins, tie=ref.tie)


# ------------------------------------------------------------------------------ samplers
LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)) * 2, jnp.float32)


def _support(sampler, logits, n=400):
    draws = jax.vmap(lambda k: sampler(logits, k))(jax.random.split(jax.random.key(7), n))
    return [set(np.asarray(draws[:, row]).tolist()) for row in range(logits.shape[0])]


_ARGMAX_CASES = dict(rows=st.integers(1, 4), n=st.integers(1, 70), levels=st.integers(1, 5),
                     seed=st.integers(0, 2**16), specials=st.lists(st.sampled_from(["nan", "inf", "-inf"]), max_size=3))


# Each example compiles for its shape: a small budget plus explicit ties, infinities and NaNs by default;
# the large budget is the -m long twin.
@settings(max_examples=6, deadline=None)
@example(rows=3, n=17, levels=2, seed=1, specials=[])  # ties
@example(rows=2, n=9, levels=3, seed=2, specials=["nan", "inf", "-inf"])
@example(rows=1, n=1, levels=1, seed=3, specials=["-inf"])
@given(**_ARGMAX_CASES)
def test_argmax_last_equals_jnp_argmax(rows, n, levels, seed, specials):
    _check_argmax_last(rows, n, levels, seed, specials)


@pytest.mark.long
@settings(max_examples=60, deadline=None)
@given(**_ARGMAX_CASES)
def test_argmax_last_equals_jnp_argmax_many(rows, n, levels, seed, specials):
    _check_argmax_last(rows, n, levels, seed, specials)


def _check_argmax_last(rows, n, levels, seed, specials):
    """Greedy's argmax (a max, then a min over the indices reaching it) against ``jnp.argmax``: exact,
    including ties (values from a few levels), infinities and NaNs (argmax takes the first NaN)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, (rows, n)).astype(np.float32)
    for special in specials:
        x[rng.integers(rows), rng.integers(n)] = float(special)
    got = jax.jit(argmax_last)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(x, axis=-1)))


def test_degenerate_samplers_equal_greedy():
    # Exact below: every sampler reads the very same LOGITS, so only the selection logic can differ.
    greedy = Greedy()(LOGITS, None)
    chex.assert_type(greedy, jnp.int32)
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(LOGITS), axis=-1))
    for k in range(5):
        key = jax.random.key(k)
        np.testing.assert_array_equal(Sample(1.0, top_k=1)(LOGITS, key), greedy)
        np.testing.assert_array_equal(Sample(3.0, top_p=1e-6)(LOGITS, key), greedy)


def test_top_k_restricts_support():
    top5 = np.argsort(-np.asarray(LOGITS), axis=-1)[:, :5]
    for row, seen in enumerate(_support(Sample(3.0, top_k=5), LOGITS)):
        assert seen <= set(top5[row].tolist())
        assert len(seen) > 1


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3], [0.1, 0.2, 0.3, 0.4]], jnp.float32))
    assert _support(Sample(1.0, top_p=0.75), logits) == [{1, 3}, {1, 2, 3}]
    assert _support(Sample(1.0, top_p=0.85), logits) == [{1, 2, 3}, {1, 2, 3}]
    assert _support(Sample(1.0, top_p=0.45), logits) == [{1}, {2, 3}]
    assert _support(Sample(1.0, top_p=1.0), logits) == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    # top-k first, then top-p over what is left: 0.5 / 0.8 = 0.625 >= 0.6.
    assert _support(Sample(1.0, top_k=2, top_p=0.6), logits)[0] == {1}
    # Tokens tied with the last one kept are kept too (no bias towards low ids).
    assert _support(Sample(1.0, top_p=0.3), jnp.zeros((1, 4)))[0] == {0, 1, 2, 3}


def test_top_k_above_vocab_is_clamped_and_inputs_in_half_precision():
    key = jax.random.key(3)
    np.testing.assert_array_equal(Sample(1.0, top_k=500)(LOGITS, key), Sample(1.0)(LOGITS, key))  # same trace
    # Exact: rounding to bfloat16 is monotone and LOGITS' top-2 gaps (>= 0.037) exceed its spacing near the
    # top (0.016 to 0.031), so the argmax survives the cast: this depends on the data, not on the program.
    np.testing.assert_array_equal(Greedy()(LOGITS.astype(jnp.bfloat16), None), Greedy()(LOGITS, None))
    chex.assert_type(Sample(0.5, top_p=0.9)(LOGITS.astype(jnp.bfloat16), key), jnp.int32)


def test_make_sampler():
    assert make_sampler() == Greedy()
    assert make_sampler(0.0, top_k=3, top_p=0.5) == Greedy()
    assert make_sampler(0.5, top_k=3) == Sample(0.5, 3, None)
    assert make_sampler(1, top_k=np.int64(4), top_p=1) == Sample(1.0, 4, 1.0)
    assert hash(make_sampler(0.7, top_p=0.9)) == hash(Sample(0.7, None, 0.9))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=1.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_bad_sampler_parameters(bad, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**{"temperature": 1.0, **bad})
    with pytest.raises(ValueError, match=match):
        Sample(**{"temperature": 1.0, **bad})


def test_sample_rejects_temperature_zero():
    with pytest.raises(ValueError, match="Greedy"):
        Sample(0.0)


# ------------------------------------------------------------------------------ bad inputs
@dataclasses.dataclass
class MutableLM:
    """Not frozen: unhashable."""

    inner: TanhLM = TanhLM()

    def prefill(self, params, tokens, lengths=None):
        return self.inner.prefill(params, tokens, lengths)

    def decode(self, params, token, cache):
        return self.inner.decode(params, token, cache)


@dataclasses.dataclass(frozen=True)
class HalfCacheLM(TanhLM):
    """decode changes the cache dtype: not a valid loop carry."""

    def decode(self, params, token, cache):
        logits, h = super().decode(params, token, cache)
        return logits, h.astype(jnp.float16)


def test_bad_inputs():
    prompt = _prompt()
    with pytest.raises(TypeError, match="prompt must be an integer array"):
        generate(MODEL, PARAMS, jnp.zeros((1, 3)), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt must have shape \(batch, seq\)"):
        generate(MODEL, PARAMS, jnp.zeros((3,), jnp.int32), max_new_tokens=4)
    for bad in (0, -2, 2.0, True, None):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            generate(MODEL, PARAMS, prompt, max_new_tokens=bad)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, sampler=Sample(1.0))
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in 1\.\.7"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, prompt_lengths=jnp.asarray([1, 2, 8]))
    with pytest.raises(ValueError, match=r"prompt_lengths must have shape \(batch,\)"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, prompt_lengths=jnp.asarray([1, 2]))
    with pytest.raises(TypeError, match="eos_token_id must be a Python int or None"):
        generate(MODEL, PARAMS, prompt, max_new_tokens=4, eos_token_id=2.0)
    with pytest.raises(TypeError, match="model must be hashable"):
        generate(MutableLM(), PARAMS, prompt, max_new_tokens=4)
    with pytest.raises(TypeError, match="model must have prefill"):
        generate(object(), PARAMS, prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="changed the cache entry"):
        generate(HalfCacheLM(), PARAMS, prompt, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate_stream(MODEL, PARAMS, prompt, max_new_tokens=0)  # checked at the call, not at next()

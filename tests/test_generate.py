"""The compiled generation loop against a plain Python loop, on the toy recurrences."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from models.toy import GLA, Retention, ToyConfig, ToyLM
from ssdkit import Greedy, Sample, generate, generate_stream, make_sampler
from ssdkit.generate import _generate

MODEL = ToyLM(ToyConfig(vocab_size=37, d_model=24, num_heads=2, head_dim=8, state_dim=8, chunk_size=8), Retention())
GLA_MODEL = ToyLM(ToyConfig(vocab_size=37, d_model=24, num_heads=2, num_groups=2, head_dim=8, state_dim=8,
                            chunk_size=8, conv_kernel=4), GLA())


def python_loop(model, params, prompt, max_new_tokens, sampler, key=None, eos=None, pad=0):
    """Reference: prefill, then decode + sample one token at a time on the host."""
    logits, cache = jax.jit(model.prefill)(params, prompt)
    decode = jax.jit(model.decode)
    out, done = [], np.zeros(prompt.shape[0], bool)
    for i in range(max_new_tokens):
        if i:
            logits, cache = decode(params, tok, cache)  # noqa: F821 - tok set in the previous step
        k = None if key is None else jax.random.fold_in(key, i)
        tok = sampler(logits, k)
        host = np.where(done, pad, np.asarray(tok))
        out.append(host)
        tok = jnp.asarray(host, jnp.int32)
        if eos is not None:
            done |= host == eos
    return np.stack(out, axis=1)


@pytest.fixture(scope="module")
def params():
    return MODEL.init(jax.random.key(0))


def _prompt(batch=3, seq=7, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 37, (batch, seq)), jnp.int32)


@pytest.mark.parametrize("model", [MODEL, GLA_MODEL], ids=["retention", "gla"])
def test_greedy_matches_python_loop(model):
    params = model.init(jax.random.key(1))
    prompt = _prompt()
    res = generate(model, params, prompt, max_new_tokens=20)
    ref = python_loop(model, params, prompt, 20, Greedy())
    np.testing.assert_array_equal(res.tokens, ref)
    np.testing.assert_array_equal(res.lengths, [20, 20, 20])
    assert res.tokens.dtype == jnp.int32


@pytest.mark.parametrize("sampler", [Sample(0.7), Sample(1.3, top_k=5), Sample(1.0, top_p=0.8),
                                     Sample(0.9, top_k=10, top_p=0.6)], ids=str)
def test_sampling_matches_python_loop(params, sampler):
    key = jax.random.key(42)
    prompt = _prompt()
    res = generate(MODEL, params, prompt, max_new_tokens=15, sampler=sampler, key=key)
    np.testing.assert_array_equal(res.tokens, python_loop(MODEL, params, prompt, 15, sampler, key))


def test_eos_stops_rows_and_the_loop(params):
    prompt = _prompt()
    ref = python_loop(MODEL, params, prompt, 12, Greedy())
    eos = int(ref[0, 3])
    first_eos = [int(np.argmax(r == eos)) if (r == eos).any() else None for r in ref]
    res = generate(MODEL, params, prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=-1)
    for row, stop in enumerate(first_eos):
        if stop is None:
            np.testing.assert_array_equal(res.tokens[row], ref[row])
            assert int(res.lengths[row]) == 12
        else:
            np.testing.assert_array_equal(res.tokens[row, :stop + 1], ref[row, :stop + 1])
            assert (np.asarray(res.tokens[row, stop + 1:]) == -1).all()
            assert int(res.lengths[row]) == stop + 1
    # Every row stops right away: the loop ends early and all later slots stay padding.
    first = int(ref[0, 0])
    only_row0 = generate(MODEL, params, prompt[:1], max_new_tokens=50, eos_token_id=first, pad_token_id=-1)
    assert int(only_row0.lengths[0]) == 1 and (np.asarray(only_row0.tokens[0, 1:]) == -1).all()


def test_traced_program_does_not_grow_with_max_new_tokens(params):
    def n_eqns(max_new):
        fn = lambda p, x: _generate.__wrapped__(  # noqa: E731
            MODEL, p, x, None, None, max_new_tokens=max_new, sampler=Greedy(), eos_token_id=0, pad_token_id=0)
        jaxpr = jax.make_jaxpr(fn)(params, _prompt())

        def count(j):
            total = 0
            for eqn in j.eqns:
                total += 1
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    total += count(sub)
            return total

        return count(jaxpr.jaxpr)

    assert n_eqns(8) == n_eqns(256)


def test_stream_matches_generate(params):
    prompt = _prompt()
    key = jax.random.key(5)
    for sampler in (Greedy(), Sample(0.8, top_k=7)):
        res = generate(MODEL, params, prompt, max_new_tokens=10, sampler=sampler, key=key, eos_token_id=3)
        streamed = list(generate_stream(MODEL, params, prompt, max_new_tokens=10, sampler=sampler, key=key,
                                        eos_token_id=3))
        got = np.stack([np.asarray(t) for t in streamed], axis=1)
        np.testing.assert_array_equal(got, np.asarray(res.tokens)[:, :got.shape[1]])
        assert got.shape[1] == int(np.max(res.lengths))


def test_samplers():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)), jnp.float32)
    greedy = Greedy()(logits, None)
    key = jax.random.key(0)
    np.testing.assert_array_equal(Sample(1.0, top_k=1)(logits, key), greedy)
    np.testing.assert_array_equal(Sample(1.0, top_p=1e-6)(logits, key), greedy)
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    draws = jax.vmap(lambda k: Sample(2.0, top_k=5)(logits, k))(jax.random.split(key, 200))
    for row in range(4):
        assert set(np.asarray(draws[:, row]).tolist()) <= set(top5[row].tolist())
    assert isinstance(make_sampler(0.0), Greedy)
    assert make_sampler(0.5, top_k=3) == Sample(0.5, 3, None)
    assert Sample(1.0, top_k=500)(logits, key).shape == (4,)  # top_k above the vocabulary is clamped
    for bad in (dict(temperature=-1.0), dict(top_k=0), dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            make_sampler(**{"temperature": 1.0, **bad})


def test_bad_inputs(params):
    with pytest.raises(TypeError, match="prompt must be an integer array"):
        generate(MODEL, params, jnp.zeros((1, 3)), max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        generate(MODEL, params, _prompt(), max_new_tokens=0)
    with pytest.raises(ValueError, match="sampling needs a PRNG key"):
        generate(MODEL, params, _prompt(), max_new_tokens=4, sampler=Sample(1.0))
    with pytest.raises(ValueError, match=r"prompt must have shape \(batch, seq\)"):
        generate(MODEL, params, jnp.zeros((3,), jnp.int32), max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt_lengths must lie in 1..7"):
        generate(MODEL, params, _prompt(), max_new_tokens=4, prompt_lengths=jnp.asarray([1, 2, 8]))

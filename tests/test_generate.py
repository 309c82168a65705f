"""The compiled generation loop and the samplers against a plain Python loop, on a tiny toy model."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ssdkit import GenerationResult, Greedy, LanguageModel, Sample, generate, generate_stream, make_sampler
from ssdkit.generate import _generate, _generation_loop

VOCAB, DIM = 32, 16


@dataclasses.dataclass(frozen=True)
class TanhLM:
    """h' = tanh(0.9 h + emb[token] @ W), logits = h' @ head; the cache is h (batch, dim) float32."""

    vocab: int = VOCAB
    dim: int = DIM

    def init(self, key):
        k_emb, k_w, k_head = jax.random.split(key, 3)
        emb = jax.random.normal(k_emb, (self.vocab, self.dim), jnp.float32)
        w = jax.random.normal(k_w, (self.dim, self.dim), jnp.float32) / np.sqrt(self.dim)
        head = jax.random.normal(k_head, (self.dim, self.vocab), jnp.float32) * 2.0
        return emb, w, head

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
PARAMS = MODEL.init(jax.random.key(0))


def python_loop(model, params, prompt, max_new_tokens, sampler, key=None, eos=None, pad=0):
    """Reference: prefill, then decode + sample one token at a time on the host."""
    logits, cache = jax.jit(model.prefill)(params, prompt)
    decode = jax.jit(model.decode)
    out, done = [], np.zeros(prompt.shape[0], bool)
    token = None
    for i in range(max_new_tokens):
        if i:
            logits, cache = decode(params, token, cache)
        token = sampler(logits, None if key is None else jax.random.fold_in(key, i))
        host = np.asarray(token)
        out.append(np.where(done, pad, host))
        if eos is not None:
            done |= host == eos
    return np.stack(out, axis=1)


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
    np.testing.assert_array_equal(res.tokens, python_loop(MODEL, PARAMS, prompt, 20, Greedy()))
    np.testing.assert_array_equal(res.lengths, [20, 20, 20])
    assert len(set(map(tuple, np.asarray(res.tokens).tolist()))) > 1  # rows differ: a real batch test


@pytest.mark.parametrize(
    "sampler",
    [Sample(0.7), Sample(1.3, top_k=5), Sample(1.0, top_p=0.8), Sample(0.9, top_k=10, top_p=0.6)],
    ids=str,
)
def test_sampling_matches_python_loop(sampler):
    key = jax.random.key(42)
    prompt = _prompt()
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=15, sampler=sampler, key=key)
    np.testing.assert_array_equal(res.tokens, python_loop(MODEL, PARAMS, prompt, 15, sampler, key))
    other = generate(MODEL, PARAMS, prompt, max_new_tokens=15, sampler=sampler, key=jax.random.key(43))
    assert not np.array_equal(res.tokens, other.tokens)  # the key matters


def _eos_case(max_new=12):
    """A prompt whose greedy row 0 emits a token at step 3 that row 0 has not emitted before and row 1
    never emits."""
    for seed in range(50):
        prompt = _prompt(batch=2, seed=seed)
        ref = python_loop(MODEL, PARAMS, prompt, max_new, Greedy())
        eos = int(ref[0, 3])
        if _first(ref[0], eos) == 3 and _first(ref[1], eos) is None:
            return prompt, ref, eos
    raise AssertionError("no prompt seed gives a row-0-only EOS at step 3")


def test_eos_stops_one_row_and_pads_it():
    prompt, ref, eos = _eos_case()
    res = generate(MODEL, PARAMS, prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=-1)
    np.testing.assert_array_equal(res.tokens[0, :4], ref[0, :4])
    np.testing.assert_array_equal(res.tokens[0, 4:], np.full(8, -1))
    np.testing.assert_array_equal(res.tokens[1], ref[1])
    np.testing.assert_array_equal(res.lengths, [4, 12])
    np.testing.assert_array_equal(
        res.tokens, python_loop(MODEL, PARAMS, prompt, 12, Greedy(), eos=eos, pad=-1)
    )


def test_loop_stops_when_every_row_is_done():
    model = CountingLM()
    loop = jax.jit(
        _generation_loop, static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id")
    )
    run = functools.partial(loop, model, PARAMS, lengths=None, key=None, max_new_tokens=30, sampler=Greedy(),
                            pad_token_id=0)
    for seed in range(50):
        prompt = _prompt(batch=2, seed=seed)
        ref = python_loop(MODEL, PARAMS, prompt, 30, Greedy())
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
    assert (np.asarray(final.tokens[:, last + 1:]) == 0).all()
    # Without EOS the loop runs to the budget, still without a decode after the last token.
    final = run(prompt, eos_token_id=None)
    assert int(final.step) == 30 and int(final.cache[1]) == 29


def test_max_new_tokens_one_runs_no_decode():
    res = generate(MODEL, PARAMS, _prompt(), max_new_tokens=1)
    np.testing.assert_array_equal(res.tokens, python_loop(MODEL, PARAMS, _prompt(), 1, Greedy()))
    np.testing.assert_array_equal(res.lengths, [1, 1, 1])


def _count_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _count_eqns(sub)
    return total


def test_traced_program_does_not_grow_with_max_new_tokens():
    def n_eqns(max_new):
        fn = functools.partial(_generation_loop, MODEL, max_new_tokens=max_new, sampler=Sample(0.8, 5, 0.9),
                               eos_token_id=3, pad_token_id=0)
        return _count_eqns(jax.make_jaxpr(fn)(PARAMS, _prompt(), None, jax.random.key(0)).jaxpr)

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
        alone = generate(MODEL, PARAMS, prompt[row:row + 1, :n], max_new_tokens=12)
        np.testing.assert_array_equal(res.tokens[row], alone.tokens[0])


def test_model_without_lengths_support():
    prompt = _prompt()
    res = generate(UnpaddedLM(), PARAMS, prompt, max_new_tokens=6)
    np.testing.assert_array_equal(res.tokens, generate(MODEL, PARAMS, prompt, max_new_tokens=6).tokens)


# ------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("sampler", [Greedy(), Sample(0.8, top_k=7)], ids=str)
def test_stream_matches_generate(sampler):
    prompt, _, eos = _eos_case()
    key = jax.random.key(5)
    for eos_id in (None, eos):
        res = generate(MODEL, PARAMS, prompt, max_new_tokens=12, sampler=sampler, key=key, eos_token_id=eos_id)
        steps = list(generate_stream(MODEL, PARAMS, prompt, max_new_tokens=12, sampler=sampler, key=key,
                                     eos_token_id=eos_id))
        for t in steps:
            chex.assert_shape(t, (2,))
            chex.assert_type(t, jnp.int32)
        got = np.stack([np.asarray(t) for t in steps], axis=1)
        assert got.shape[1] == int(np.max(res.lengths))
        np.testing.assert_array_equal(got, np.asarray(res.tokens)[:, :got.shape[1]])


def test_stream_stops_early_when_every_row_is_done():
    prompt, ref, eos = _eos_case()
    steps = list(generate_stream(MODEL, PARAMS, prompt[:1], max_new_tokens=12, eos_token_id=eos))
    assert len(steps) == 4
    np.testing.assert_array_equal(np.concatenate(steps), ref[0, :4])


def test_stream_with_prompt_lengths():
    lengths = jnp.asarray([7, 2, 4])
    res = generate(MODEL, PARAMS, _prompt(seed=4), max_new_tokens=6, prompt_lengths=lengths)
    got = np.stack(list(generate_stream(MODEL, PARAMS, _prompt(seed=4), max_new_tokens=6, prompt_lengths=lengths)),
                   axis=1)
    np.testing.assert_array_equal(got, res.tokens)


# ------------------------------------------------------------------------------ samplers
LOGITS = jnp.asarray(np.random.default_rng(0).standard_normal((4, 50)) * 2, jnp.float32)


def _support(sampler, logits, n=400):
    draws = jax.vmap(lambda k: sampler(logits, k))(jax.random.split(jax.random.key(7), n))
    return [set(np.asarray(draws[:, row]).tolist()) for row in range(logits.shape[0])]


def test_degenerate_samplers_equal_greedy():
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
    np.testing.assert_array_equal(Sample(1.0, top_k=500)(LOGITS, key), Sample(1.0)(LOGITS, key))
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

"""The toy recurrences: prefill equals step-by-step decode; the core is generic."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssdkit import LMConfig, MixerLM
from ssdkit.models.toy import GLA, Retention
from tests.helpers import assert_close

MODELS = {
    "retention": MixerLM(LMConfig(vocab_size=40, num_heads=4, num_groups=4, chunk_size=8), Retention()),
    "retention-shared-keys": MixerLM(LMConfig(vocab_size=40, num_heads=4, num_groups=1, chunk_size=5),
                                   Retention()),
    "gla": MixerLM(LMConfig(vocab_size=40, num_heads=2, num_groups=2, chunk_size=8, conv_kernel=4), GLA()),
}
# One scalar-decay mixer (4 groups) and the diagonal-decay one with a conv by default; retention with shared
# keys (one group, chunks of 5) runs the same mixer through the core's group handling (test_scan): long.
NAMES = ["gla", "retention", pytest.param("retention-shared-keys", marks=pytest.mark.long)]

# The model's methods are plain functions: jit each once (static model), so that a test compiles one
# program per shape rather than every operation on its own; both tests below share these programs.
FORWARD = jax.jit(MixerLM.forward, static_argnums=0)
PREFILL = jax.jit(MixerLM.prefill, static_argnums=0)
DECODE = jax.jit(MixerLM.decode, static_argnums=0)
PREFIX = 10


def _tokens(model, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq)).astype(np.int32)


def _params64(model, seed):
    params = model.init(jax.random.key(seed))  # drawn in float32: its eager ops compile once, not again for x64
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _decode_from(model, params, tokens, cache, start):
    """Logits at positions start.. of ``tokens`` from O(1) decode steps, and the cache after them."""
    logits = []
    for t in range(start, tokens.shape[1]):
        out, cache = DECODE(model, params, tokens[:, t], cache)
        logits.append(np.asarray(out))
    return np.stack(logits, axis=1), cache


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_equals_forward(name):
    """Float64: chunked forward at every position == prefill of a prefix + O(1) decode steps.

    The prefill starts from an explicit empty cache (what prefill makes without one): the program of the
    chunked prefill below, compiled once for both tests."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 0)
        tokens = _tokens(model, 2, 27)
        full = np.asarray(FORWARD(model, params, tokens))
        last, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        assert_close(last, full[:, PREFIX - 1], rtol=1e-10, name="prefill logits")
        stepped, _ = _decode_from(model, params, tokens, cache, PREFIX)
        for t in range(PREFIX, 27):
            assert_close(stepped[:, t - PREFIX], full[:, t], rtol=1e-10, name=f"decode logits at {t}")


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_continues_the_cache(name):
    """A prefill continuing another's cache: its last logits equal forward's, its state the state decode
    reaches over the same tokens from the same cache (float64, the programs of the test above)."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 1)
        tokens = _tokens(model, 2, 2 * PREFIX + 7, seed=1)
        full = np.asarray(FORWARD(model, params, tokens))
        _, c1 = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        last, c2 = PREFILL(model, params, tokens[:, PREFIX:2 * PREFIX], c1)
        _, stepped = _decode_from(model, params, tokens[:, :2 * PREFIX], c1, PREFIX)
        assert_close(last, full[:, 2 * PREFIX - 1], rtol=1e-10, name="logits")
        assert_close(c2.state, stepped.state, rtol=1e-10, name="state")
        assert_close(c2.conv, stepped.conv, rtol=1e-10, name="conv window")


def test_the_default_initialisation_starts_near_chance():
    """LMConfig's default embedding scale is the working one (0.02, as Mamba-2's and `ssdkit train`'s):
    the first loss of a 16-token vocabulary is about ln 16 = 2.77 nats (with 1.0 and a tied head it was
    17.8, and training stalled)."""
    model = MixerLM(LMConfig(vocab_size=16), Retention())
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 16)
    loss, _ = jax.jit(model.loss)(model.init(jax.random.key(0)), tokens)
    assert abs(float(loss) - np.log(16)) < 0.1, float(loss)

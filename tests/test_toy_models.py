"""The toy recurrences: prefill equals step-by-step decode; the core is generic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdkit.models.toy import GLA, Retention, ToyConfig, ToyLM
from tests.helpers import assert_close

MODELS = {
    "retention": ToyLM(ToyConfig(vocab_size=40, num_heads=4, num_groups=4, chunk_size=8), Retention()),
    "retention-shared-keys": ToyLM(ToyConfig(vocab_size=40, num_heads=4, num_groups=1, chunk_size=5),
                                   Retention()),
    "gla": ToyLM(ToyConfig(vocab_size=40, num_heads=2, num_groups=2, chunk_size=8, conv_kernel=4), GLA()),
}


def _tokens(model, batch, seq, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq)), jnp.int32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prefill_then_decode_equals_forward(name):
    """Float64: chunked forward at every position == prefill of a prefix + O(1) decode steps."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = model.init(jax.random.key(0), jnp.float64)
        tokens = _tokens(model, 2, 27)
        full = model.forward(params, tokens)
        last, cache = model.prefill(params, tokens[:, :10])
        assert_close(last, full[:, 9], rtol=1e-10, name="prefill logits")
        decode = jax.jit(model.decode)
        for t in range(10, 27):
            logits, cache = decode(params, tokens[:, t], cache)
            assert_close(logits, full[:, t], rtol=1e-10, name=f"decode logits at {t}")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_chunked_prefill_continues_the_cache(name):
    model = MODELS[name]
    params = model.init(jax.random.key(1))
    tokens = _tokens(model, 1, 23)
    last, cache = model.prefill(params, tokens)
    _, c1 = model.prefill(params, tokens[:, :9])
    last2, c2 = model.prefill(params, tokens[:, 9:], cache=c1)
    assert_close(last2, last, rtol=1e-5, name="logits")
    assert_close(c2.state, cache.state, rtol=1e-5, name="state")

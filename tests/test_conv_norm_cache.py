"""Short causal conv, norms and the PyTree cache against plain numpy oracles.

Float64 comparisons: 1e-12 relative (a K-term sum / a mean of squares, no accumulation across steps).
Float32: 1e-6 relative (one rounding per term of a K-term sum).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ssdkit
from ssdkit import Recurrence, RecurrentCache, causal_conv1d, causal_conv1d_step, gated_rms_norm, rms_norm
from tests.helpers import assert_close


def conv_oracle(x, w, bias, window):
    """out[t, c] = bias[c] + Σ_k w[k, c] · in[t-(K-1)+k, c], history from ``window``."""
    k = w.shape[0]
    full = np.concatenate([window, x], axis=1)
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        for i in range(k):
            out[:, t] += w[i] * full[:, t + i]
    return out + (0 if bias is None else bias), full[:, full.shape[1] - (k - 1):]


@given(batch=st.integers(1, 2), seq=st.integers(1, 20), chan=st.integers(1, 6), k=st.integers(1, 5),
       with_window=st.booleans(), with_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_conv_matches_oracle_and_steps(batch, seq, chan, k, with_window, with_bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((batch, seq, chan)), rng.standard_normal((k, chan))
    bias = rng.standard_normal(chan) if with_bias else None
    window = rng.standard_normal((batch, k - 1, chan)) if with_window else np.zeros((batch, k - 1, chan))
    ref_y, ref_window = conv_oracle(x, w, bias, window)
    with jax.enable_x64(True):
        j = lambda a: None if a is None else jnp.asarray(a)  # noqa: E731
        y, new_window = causal_conv1d(j(x), j(w), j(bias), window=j(window) if with_window else None)
        assert_close(y, ref_y, rtol=1e-12, name="y")
        assert_close(new_window, ref_window, rtol=0, name="window")
        win, steps = j(window), []
        for t in range(seq):
            y_t, win = causal_conv1d_step(j(x)[:, t], j(w), j(bias), win)
            steps.append(y_t)
        assert_close(jnp.stack(steps, 1), ref_y, rtol=1e-12, name="stepped y")
        assert_close(win, ref_window, rtol=0, name="stepped window")


def test_conv_split_and_lengths(rng):
    x = jnp.asarray(rng.standard_normal((3, 12, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    b = jnp.asarray(rng.standard_normal(5), jnp.float32)
    y, win = causal_conv1d(x, w, b)
    y1, w1 = causal_conv1d(x[:, :7], w, b)
    y2, w2 = causal_conv1d(x[:, 7:], w, b, window=w1)
    assert_close(jnp.concatenate([y1, y2], 1), y, rtol=1e-6, name="split y")
    np.testing.assert_array_equal(w2, win)
    lengths = jnp.asarray([12, 2, 5], jnp.int32)
    _, wl = causal_conv1d(x, w, b, lengths=lengths)
    for i, n in enumerate([12, 2, 5]):
        _, w_alone = causal_conv1d(x[i:i + 1, :n], w, b)
        np.testing.assert_array_equal(wl[i], w_alone[0])


def test_conv_dtype_and_errors():
    x, w = jnp.ones((1, 4, 3), jnp.bfloat16), jnp.ones((4, 3), jnp.float32)
    y, win = causal_conv1d(x, w)
    assert y.dtype == jnp.bfloat16 and win.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, chan\)"):
        causal_conv1d(jnp.ones((4, 3)), w)
    with pytest.raises(ValueError, match=r"weight must have shape \(K, chan\)"):
        causal_conv1d(jnp.ones((1, 4, 2)), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(chan,\)"):
        causal_conv1d(jnp.ones((1, 4, 3)), w, jnp.ones(4))
    with pytest.raises(ValueError, match=r"window must have shape \(batch, K-1, chan\) = \(1, 3, 3\)"):
        causal_conv1d(jnp.ones((1, 4, 3)), w, window=jnp.ones((1, 4, 3)))
    with pytest.raises(TypeError, match="x must be a floating array"):
        causal_conv1d(jnp.ones((1, 4, 3), jnp.int32), w)
    with pytest.raises(ValueError, match="needs the carried window"):
        causal_conv1d_step(jnp.ones((1, 3)), w, None, None)


def test_rms_norms_match_oracle(rng):
    x, z = rng.standard_normal((2, 5, 12)), rng.standard_normal((2, 5, 12))
    w = rng.standard_normal(12)
    with jax.enable_x64(True):
        ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-5) * w
        assert_close(rms_norm(jnp.asarray(x), jnp.asarray(w)), ref, rtol=1e-12, name="rms_norm")
        g = x * z / (1 + np.exp(-z))
        for groups in (1, 3):
            gg = g.reshape(2, 5, groups, 12 // groups)
            ref_g = (gg / np.sqrt(np.mean(gg**2, -1, keepdims=True) + 1e-5)).reshape(2, 5, 12) * w
            out = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), num_groups=groups)
            assert_close(out, ref_g, rtol=1e-12, name=f"gated_rms_norm groups={groups}")
        one = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), num_groups=1)
        three = gated_rms_norm(jnp.asarray(x), jnp.asarray(z), jnp.asarray(w), num_groups=3)
        assert float(jnp.max(jnp.abs(one - three))) > 1e-3  # groups really change the result
    half = rms_norm(jnp.ones((2, 4), jnp.bfloat16), jnp.ones(4, jnp.bfloat16))
    assert half.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="positive divisor"):
        gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 12)), jnp.ones(12), num_groups=5)
    with pytest.raises(ValueError, match=r"weight must have shape \(12,\)"):
        rms_norm(jnp.ones((2, 12)), jnp.ones(11))
    with pytest.raises(ValueError, match="z must have the shape of y"):
        gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 11)), jnp.ones(12))


SPEC = Recurrence(num_heads=4, head_dim=3, state_dim=5, num_groups=2)


def test_cache_shapes_and_pytree():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=3,
                             conv_dtype=jnp.bfloat16)
    assert c.conv.shape == (3, 2, 3, 7) and c.conv.dtype == jnp.bfloat16
    assert c.state.shape == (3, 2, 4, 3, 5) and c.state.dtype == jnp.float32
    assert c.num_layers == 3 and c.batch_size == 2
    single = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7)
    assert single.num_layers is None and single.state.shape == (2, 4, 3, 5)
    doubled = jax.tree_util.tree_map(lambda a: a + 1, c)
    assert isinstance(doubled, RecurrentCache) and float(doubled.state[0, 0, 0, 0, 0]) == 1.0
    out = jax.jit(lambda cache: dataclass_add(cache, 2.0))(c)
    assert isinstance(out, RecurrentCache) and float(out.state.sum()) == 2.0 * out.state.size

    def per_layer(carry, layer_cache):
        assert layer_cache.state.shape == (2, 4, 3, 5)  # one layer's slice
        return carry + layer_cache.state.sum(), RecurrentCache(conv=layer_cache.conv, state=layer_cache.state + 1)

    total, stacked = jax.lax.scan(per_layer, jnp.float32(0), c)
    assert isinstance(stacked, RecurrentCache) and stacked.state.shape == c.state.shape
    with pytest.raises(TypeError, match="recurrent state must be float32"):
        RecurrentCache.zeros(SPEC, batch=1, kernel_size=4, conv_channels=7, state_dtype=jnp.bfloat16)


def dataclass_add(cache: RecurrentCache, v) -> RecurrentCache:
    return RecurrentCache(conv=cache.conv, state=cache.state + v)


def test_cache_can_be_donated():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=2)
    step = jax.jit(lambda cache: dataclass_add(cache, 1.0), donate_argnums=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
        out = step(c)
    assert float(out.state.mean()) == 1.0
    assert c.state.is_deleted()  # the input buffer was handed over, not copied


def test_public_api_exports():
    for name in ("ssd_scan", "ssd_step", "ssd_reference", "causal_conv1d", "causal_conv1d_step", "rms_norm",
                 "gated_rms_norm", "RecurrentCache", "Recurrence", "generate", "scan_layers"):
        assert hasattr(ssdkit, name), name

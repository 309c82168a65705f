"""The registered PyTree cache: shapes and dtypes, jit / tree_map / scan over layers, donation.

Comparisons here are on zeros, small integers and copies (exact: data movement and exactly
representable sums) or on one recurrence step computed inside and outside a scanned program (two
compiled programs: equal up to float32 rounding, ``assert_same_up_to_rounding``).
"""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ssdkit import Recurrence, RecurrentCache, causal_conv1d_step, ssd_step
from tests.helpers import assert_same_up_to_rounding

SPEC = Recurrence(num_heads=4, head_dim=3, state_dim=5, num_groups=2)


def bump(cache: RecurrentCache, v) -> RecurrentCache:
    return RecurrentCache(conv=cache.conv + v, state=cache.state + v)


# ------------------------------------------------------------------------------ construction
def test_zeros_unstacked():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7)
    assert c.conv.shape == (2, 3, 7) and c.conv.dtype == jnp.float32
    assert c.state.shape == (2, 4, 3, 5) and c.state.dtype == jnp.float32
    assert c.num_layers is None and c.batch_size == 2
    assert not np.any(np.asarray(c.conv)) and not np.any(np.asarray(c.state))


def test_zeros_stacked_with_half_precision_conv():
    c = RecurrentCache.zeros(SPEC, batch=3, kernel_size=4, conv_channels=7, num_layers=5, conv_dtype=jnp.bfloat16)
    assert c.conv.shape == (5, 3, 3, 7) and c.conv.dtype == jnp.bfloat16
    assert c.state.shape == (5, 3, 4, 3, 5) and c.state.dtype == jnp.float32  # float32 whatever the compute dtype
    assert c.num_layers == 5 and c.batch_size == 3


def test_zeros_kernel_size_one_and_numpy_ints():
    c = RecurrentCache.zeros(SPEC, batch=np.int64(2), kernel_size=1, conv_channels=7, num_layers=np.int32(2))
    assert c.conv.shape == (2, 2, 0, 7) and c.num_layers == 2


def test_zeros_float64_state_under_x64():
    with jax.enable_x64(True):
        c = RecurrentCache.zeros(SPEC, batch=1, kernel_size=4, conv_channels=7, conv_dtype=jnp.float64,
                                 state_dtype=jnp.float64)
        assert c.state.dtype == jnp.float64 and c.conv.dtype == jnp.float64


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(state_dtype=jnp.bfloat16), TypeError, r"recurrent state must be float32 \(or float64\), got bfloat16"),
        (dict(state_dtype=jnp.float16), TypeError, r"recurrent state must be float32 \(or float64\), got float16"),
        (dict(state_dtype=jnp.int32), TypeError, "recurrent state must be float32"),
        (dict(conv_dtype=jnp.int32), TypeError, "conv_dtype must be a floating dtype"),
        (dict(batch=0), ValueError, "batch must be a positive integer, got 0"),
        (dict(kernel_size=0), ValueError, "kernel_size must be a positive integer, got 0"),
        (dict(conv_channels=2.5), ValueError, "conv_channels must be a positive integer, got 2.5"),
        (dict(num_layers=0), ValueError, "num_layers must be a positive integer, got 0"),
        (dict(num_layers=True), ValueError, "num_layers must be a positive integer, got True"),
        (dict(spec=(4, 3, 5)), TypeError, "spec must be an ssdkit.Recurrence"),
    ],
)
def test_zeros_rejects_bad_arguments(kwargs, error, match):
    args = dict(spec=SPEC, batch=2, kernel_size=4, conv_channels=7) | kwargs
    spec = args.pop("spec")
    with pytest.raises(error, match=match):
        RecurrentCache.zeros(spec, **args)


# ------------------------------------------------------------------------------ as a PyTree
def test_tree_map_and_leaves():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=3)
    leaves, treedef = jax.tree_util.tree_flatten(c)
    assert len(leaves) == 2
    assert isinstance(jax.tree_util.tree_unflatten(treedef, leaves), RecurrentCache)
    plus = jax.tree_util.tree_map(lambda a: a + 1, c)
    assert isinstance(plus, RecurrentCache) and plus.state.dtype == jnp.float32
    chex.assert_trees_all_equal(plus, bump(c, 1))  # small integers in float: exact
    shapes = jax.tree_util.tree_map(lambda a: a.shape, c)
    assert shapes.conv == (3, 2, 3, 7) and shapes.state == (3, 2, 4, 3, 5)


def test_jit_takes_and_returns_the_cache():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=2, conv_dtype=jnp.bfloat16)
    out = jax.jit(lambda cache, v: bump(cache, v))(c, 2.0)
    assert isinstance(out, RecurrentCache)
    chex.assert_trees_all_equal_shapes_and_dtypes(out, c)  # the cache keeps its layout through jit
    chex.assert_trees_all_equal(out, bump(c, 2.0))  # 0 + 2 is exact in every dtype


def test_scan_over_layers_gives_per_layer_caches():
    layers = 3
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=layers)
    c = RecurrentCache(conv=c.conv + jnp.arange(layers, dtype=c.conv.dtype)[:, None, None, None],
                       state=c.state + 10 * jnp.arange(layers, dtype=c.state.dtype)[:, None, None, None, None])

    def layer(carry, cache):
        assert isinstance(cache, RecurrentCache)
        assert cache.num_layers is None and cache.batch_size == 2  # one layer's slice
        assert cache.conv.shape == (2, 3, 7) and cache.state.shape == (2, 4, 3, 5)
        seen = (cache.conv[0, 0, 0], cache.state[0, 0, 0, 0])
        return carry + 1, (bump(cache, 1.0), seen)

    count, (new, seen) = jax.jit(lambda c: lax.scan(layer, 0, c))(c)
    assert int(count) == layers and isinstance(new, RecurrentCache) and new.num_layers == layers
    np.testing.assert_array_equal(np.asarray(seen[0]), [0.0, 1.0, 2.0])  # layer i saw its own slice
    np.testing.assert_array_equal(np.asarray(seen[1]), [0.0, 10.0, 20.0])
    chex.assert_trees_all_equal(new, bump(c, 1.0))  # small integers: exact


@pytest.mark.numerics  # the one float comparison of two compiled programs here: rerun with AVX2 (README)
def test_decode_step_over_layers_keeps_the_cache_layout(rng):
    # A two-layer decode step: conv step + SSD step per layer, the cache as scan xs. The state stays
    # float32 while the conv window stays in the bfloat16 compute dtype.
    layers, batch, k, chan = 2, 2, 4, 6
    cache = RecurrentCache.zeros(SPEC, batch=batch, kernel_size=k, conv_channels=chan, num_layers=layers,
                                 conv_dtype=jnp.bfloat16)
    cache = RecurrentCache(conv=jnp.asarray(rng.standard_normal(cache.conv.shape), jnp.bfloat16),
                           state=jnp.asarray(rng.standard_normal(cache.state.shape), jnp.float32))
    weights = jnp.asarray(rng.standard_normal((layers, k, chan)), jnp.float32)
    h, p, n, g = SPEC.num_heads, SPEC.head_dim, SPEC.state_dim, SPEC.num_groups
    x = jnp.asarray(rng.standard_normal((batch, chan)), jnp.bfloat16)
    vals = jnp.asarray(rng.standard_normal((batch, h, p)), jnp.bfloat16)
    keys = jnp.asarray(rng.standard_normal((batch, g, n)), jnp.bfloat16)
    log_a = jnp.full((batch, h), -0.1, jnp.float32)

    def layer(_, xs):
        w, layer_cache = xs
        _, window = causal_conv1d_step(x, w, None, layer_cache.conv)
        _, state = ssd_step(layer_cache.state, vals, log_a, keys, keys)
        return None, RecurrentCache(conv=window, state=state)

    _, new = jax.jit(lambda c: lax.scan(layer, None, (weights, c)))(cache)
    chex.assert_trees_all_equal_shapes_and_dtypes(new, cache)
    for i in range(layers):
        # The window shift is a copy: exact.
        np.testing.assert_array_equal(np.asarray(new.conv[i, :, :-1]), np.asarray(cache.conv[i, :, 1:]))
        np.testing.assert_array_equal(np.asarray(new.conv[i, :, -1]), np.asarray(x))
        _, want = ssd_step(cache.state[i], vals, log_a, keys, keys)
        # The same float32 step inside the scanned program and alone: two programs, equal up to rounding.
        assert_same_up_to_rounding(new.state[i], want, name=f"layer {i} state")


def test_cache_can_be_donated():
    c = RecurrentCache.zeros(SPEC, batch=2, kernel_size=4, conv_channels=7, num_layers=2)
    expected = bump(c, 1.0)
    step = jax.jit(lambda cache: bump(cache, 1.0), donate_argnums=0)
    with warnings.catch_warnings(record=True) as caught:
        # Backends that cannot reuse a donated buffer fall back to a copy with a "donated buffers were
        # not usable" warning; record it instead of failing (pytest turns warnings into errors).
        warnings.simplefilter("always")
        out = step(c)
        again = step(out)  # the returned cache can be donated in turn, as in a decode loop
    unusable = [w for w in caught if "donated buffers were not usable" in str(w.message).lower()]
    assert len(unusable) == len(caught), [str(w.message) for w in caught]  # no other warning
    assert isinstance(again, RecurrentCache)
    chex.assert_trees_all_equal(again, bump(expected, 1.0))  # 0 + 1 + 1: exact
    if not unusable:  # real donation (as on CPU today): the inputs were handed over, not copied
        assert c.state.is_deleted() and c.conv.is_deleted() and out.state.is_deleted()

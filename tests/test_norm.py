"""RMSNorm and Mamba-2's gated group RMSNorm against numpy float64 oracles.

Tolerances: a norm is a mean of d squares, one rsqrt and two products per entry; float64 agrees with
the oracle to ~1e-15 relative (1e-12 leaves room for summation order); float32 to ~1e-6 (1e-5 used).
Half-precision outputs are the float32 result rounded once: 2^-8 relative for bfloat16 (1e-2 used),
2^-11 for float16 (2e-3 used).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssdkit import gated_rms_norm, rms_norm
from tests.helpers import assert_same_up_to_rounding

# Compares floats from compiled programs: rerun with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (README).
pytestmark = pytest.mark.numerics


def rms_oracle(x, w, eps=1e-5):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * np.asarray(w, np.float64)


def gated_oracle(y, z, w, groups, eps=1e-5):
    """Per-group loop: ``g = y ⊙ silu(z)``; each slice of d/groups features is RMS-normalised alone."""
    y, z, w = (np.asarray(a, np.float64) for a in (y, z, w))
    g = y * z / (1.0 + np.exp(-z))
    size = g.shape[-1] // groups
    out = np.empty_like(g)
    for i in range(groups):
        part = g[..., i * size : (i + 1) * size]
        out[..., i * size : (i + 1) * size] = part / np.sqrt(np.mean(part**2, axis=-1, keepdims=True) + eps)
    return out * w


lead_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def _rms_norm_matches_oracle(lead, d, eps, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((*lead, d)), rng.standard_normal(d)
    ref = rms_oracle(x, w, eps)
    with jax.enable_x64(True):
        out = rms_norm(jnp.asarray(x), jnp.asarray(w), eps=eps)
        assert out.dtype == jnp.float64 and out.shape == x.shape
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)  # float64: see module doc
    out32 = rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), eps=eps)
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out32), ref, rtol=1e-5, atol=1e-5)  # float32: see module doc


@given(lead=lead_shapes, d=st.integers(1, 24), eps=st.sampled_from([1e-5, 1e-6, 0.1]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=3)
def test_rms_norm_matches_oracle(lead, d, eps, seed):
    _rms_norm_matches_oracle(lead, d, eps, seed)


@pytest.mark.long  # the profile's full example budget
@given(lead=lead_shapes, d=st.integers(1, 24), eps=st.sampled_from([1e-5, 1e-6, 0.1]), seed=st.integers(0, 2**32 - 1))
def test_rms_norm_matches_oracle_long(lead, d, eps, seed):
    _rms_norm_matches_oracle(lead, d, eps, seed)


def _gated_rms_norm_matches_per_group_oracle(lead, size, groups, seed):
    d = size * groups
    rng = np.random.default_rng(seed)
    y, z, w = rng.standard_normal((*lead, d)), rng.standard_normal((*lead, d)), rng.standard_normal(d)
    ref = gated_oracle(y, z, w, groups)
    with jax.enable_x64(True):
        out = gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), num_groups=groups)
        assert out.dtype == jnp.float64 and out.shape == y.shape
        np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-12, atol=1e-12)  # float64: see module doc
    out32 = gated_rms_norm(jnp.asarray(y, jnp.float32), jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32),
                           num_groups=groups)
    np.testing.assert_allclose(np.asarray(out32), ref, rtol=1e-5, atol=1e-5)  # float32: see module doc


@given(lead=lead_shapes, size=st.integers(1, 6), groups=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=3)
def test_gated_rms_norm_matches_per_group_oracle(lead, size, groups, seed):
    _gated_rms_norm_matches_per_group_oracle(lead, size, groups, seed)


@pytest.mark.long  # the profile's full example budget
@given(lead=lead_shapes, size=st.integers(1, 6), groups=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**32 - 1))
def test_gated_rms_norm_matches_per_group_oracle_long(lead, size, groups, seed):
    _gated_rms_norm_matches_per_group_oracle(lead, size, groups, seed)


def test_groups_change_the_result(rng):
    y, z, w = rng.standard_normal((3, 12)), rng.standard_normal((3, 12)), rng.standard_normal(12)
    with jax.enable_x64(True):
        one = np.asarray(gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), num_groups=1))
        three = np.asarray(gated_rms_norm(jnp.asarray(y), jnp.asarray(z), jnp.asarray(w), num_groups=3))
    # Per-group scales differ for random data, so the outputs differ by O(1), far beyond rounding.
    assert np.max(np.abs(one - three)) > 1e-2
    np.testing.assert_allclose(three, gated_oracle(y, z, w, 3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one, gated_oracle(y, z, w, 1), rtol=1e-12, atol=1e-12)
    # One group is plain RMSNorm of the gated input.
    gate = y * z / (1.0 + np.exp(-z))
    np.testing.assert_allclose(one, rms_oracle(gate, w), rtol=1e-12, atol=1e-12)


def test_gate_is_applied_before_the_norm():
    # With a zero-mean-square group the gate decides everything: silu(0) = 0 makes y ⊙ silu(z) = 0.
    y = jnp.ones((1, 4))
    z = jnp.asarray([[0.0, 0.0, 5.0, 5.0]])
    out = gated_rms_norm(y, z, jnp.ones(4), num_groups=2)
    np.testing.assert_array_equal(np.asarray(out[0, :2]), [0.0, 0.0])  # 0 · anything: exact
    # The second group is a constant vector: normalised to ~1 (eps = 1e-5 against a mean square ~25).
    np.testing.assert_allclose(np.asarray(out[0, 2:]), [1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize(("dtype", "tol"), [(jnp.bfloat16, 1e-2), (jnp.float16, 2e-3), (jnp.float32, 1e-5)])
def test_dtype_is_preserved(rng, dtype, tol):
    x, z, w = rng.standard_normal((4, 16)), rng.standard_normal((4, 16)), rng.standard_normal(16)
    xq = np.asarray(jnp.asarray(x, dtype), np.float64)  # the input as the function sees it
    zq = np.asarray(jnp.asarray(z, dtype), np.float64)
    out = rms_norm(jnp.asarray(x, dtype), jnp.asarray(w, jnp.float32))
    assert out.dtype == dtype
    # Computed in float32 and rounded once to ``dtype``: tolerance per the module doc, relative to max|ref|.
    ref = rms_oracle(xq, w)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=tol * np.abs(ref).max())
    gated = gated_rms_norm(jnp.asarray(x, dtype), jnp.asarray(z, dtype), jnp.asarray(w, jnp.float32), num_groups=4)
    assert gated.dtype == dtype
    ref = gated_oracle(xq, zq, w, 4)
    np.testing.assert_allclose(np.asarray(gated, np.float64), ref, rtol=0, atol=tol * np.abs(ref).max())


def test_large_inputs_do_not_overflow_in_half_precision():
    # 300² overflows float16 (max 65504): the mean of squares must be taken in float32.
    x = jnp.full((2, 8), 300.0, jnp.float16)
    out = rms_norm(x, jnp.ones(8, jnp.float16))
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0, rtol=1e-3)  # float16 rounding of ~1


def test_works_under_jit_and_grad(rng):
    y, z, w = (jnp.asarray(a, jnp.float32) for a in (rng.standard_normal((2, 6)), rng.standard_normal((2, 6)),
                                                     rng.standard_normal(6)))
    f = jax.jit(lambda y, z, w: gated_rms_norm(y, z, w, num_groups=2))
    # The same computation in the caller's program and alone: equal up to float32 rounding.
    assert_same_up_to_rounding(f(y, z, w), gated_rms_norm(y, z, w, num_groups=2), name="jitted gated_rms_norm")
    grad = jax.grad(lambda x: rms_norm(x, w).sum())(y)
    assert grad.shape == y.shape and bool(jnp.all(jnp.isfinite(grad)))


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: rms_norm(jnp.ones((2, 12)), jnp.ones(11)), ValueError,
         r"weight must have shape \(12,\) to match the last axis of x \(2, 12\), got \(11,\)"),
        (lambda: rms_norm(jnp.ones((2, 12)), jnp.ones((1, 12))), ValueError, r"weight must have shape \(12,\)"),
        (lambda: rms_norm(jnp.float32(1.0), jnp.ones(1)), ValueError, "x must have at least one axis"),
        (lambda: rms_norm(jnp.ones((2, 4), jnp.int32), jnp.ones(4)), TypeError, "x must be a floating array"),
        (lambda: rms_norm(jnp.ones((2, 4)), jnp.ones(4, jnp.int32)), TypeError, "weight must be a floating array"),
        (lambda: rms_norm(jnp.ones((2, 4)), jnp.ones(4), eps=-1.0), ValueError, "eps must be a non-negative number"),
        (lambda: gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 12)), jnp.ones(12), num_groups=5), ValueError,
         r"num_groups must be a positive divisor of the feature size d=12.*got 5"),
        (lambda: gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 12)), jnp.ones(12), num_groups=0), ValueError,
         "num_groups must be a positive divisor"),
        (lambda: gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 12)), jnp.ones(12), num_groups=2.0), ValueError,
         "num_groups must be a positive divisor"),
        (lambda: gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 11)), jnp.ones(12)), ValueError,
         r"z must have the shape of y \(2, 12\), got \(2, 11\)"),
        (lambda: gated_rms_norm(jnp.ones((2, 12)), jnp.ones((2, 12)), jnp.ones(11)), ValueError,
         r"weight must have shape \(12,\) to match the last axis of y"),
        (lambda: gated_rms_norm(jnp.ones((2, 4)), jnp.ones((2, 4), jnp.int32), jnp.ones(4)), TypeError,
         "z must be a floating array"),
    ],
)
def test_bad_inputs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call()

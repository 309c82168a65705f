"""Verify-then-commit (ssdkit.core.rollback) against the step-by-step oracle: for every prefix j of k verified
steps, the committed state equals j ssd_steps and the committed window j causal_conv1d_steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ssdkit
from ssdkit.core.rollback import ScanRecord, conv_commit, ssd_commit, ssd_verify
from tests.helpers import assert_close
from tests.test_delta_rule import CANONICAL, F32_RTOL, F64_RTOL, make_inputs

# The tests comparing floats from compiled programs with the oracle carry the numerics mark (README: rerun
# with XLA_FLAGS=--xla_cpu_max_isa=AVX2); the conv window is data movement, the rest validation.


def _inputs(seed, batch, k, heads, head_dim, state, groups, diagonal, dtype):
    """Random inputs from numpy (jax.random would compile its generator for every new shape)."""
    rng = np.random.default_rng(seed)
    tail = (state,) if diagonal else ()

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    x = normal(batch, k, heads, head_dim)
    log_a = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((batch, k, heads, *tail))), dtype)  # -softplus
    b = normal(batch, k, groups, state)
    c = normal(batch, k, groups, state)
    s0 = normal(batch, heads, head_dim, state)
    return s0, x, log_a, b, c


def _stepped(s0, x, log_a, b, c):
    """ssd_step over every position: the outputs (batch, k, H, P) and the state after each step."""
    ys, states, s = [], [s0], s0
    for t in range(x.shape[1]):
        y, s = ssdkit.ssd_step(s, x[:, t], log_a[:, t], b[:, t], c[:, t])
        ys.append(y)
        states.append(s)
    return jnp.stack(ys, 1), states


# The same sums in another order: float64 ~1e-16, float32 ~1e-7 of the summed terms' magnitude (k <= 8
# terms), bounds ~1e4x / 10x. Relative to the terms, not the result: a decayed state can be far smaller than
# the terms that built it (they cancel), and its rounding error is set by the terms.
TOL = {jnp.float64: 1e-12, jnp.float32: 1e-6}


def _term_scale(s0, x, b):
    return max(float(jnp.max(jnp.abs(s0))), float(jnp.max(jnp.abs(x)) * jnp.max(jnp.abs(b))))


def _check_commit_every_prefix(seed, batch, k, heads, head_dim, state, shared_group, diagonal, dtype):
    groups = 1 if shared_group else heads
    with jax.enable_x64(dtype == jnp.float64):
        s0, x, log_a, b, c = _inputs(seed, batch, k, heads, head_dim, state, groups, diagonal, dtype)
        y, record = ssd_verify(s0, x, log_a, b, c)
        want_y, states = _stepped(s0, x, log_a, b, c)
        bound = TOL[dtype] * _term_scale(s0, x, b)
        assert_close(y, want_y, rtol=0, atol=bound * float(jnp.max(jnp.abs(c))) * state, name="verified outputs")
        for j in range(k + 1):  # every row the same prefix
            got = ssd_commit(record, jnp.full((batch,), j, jnp.int32))
            assert got.dtype == s0.dtype
            assert_close(got, states[j], rtol=0, atol=bound, name=f"state after {j} of {k}")
        # each row its own prefix
        accepted = jnp.asarray(np.random.default_rng(seed).integers(0, k + 1, batch), jnp.int32)
        got = ssd_commit(record, accepted)
        for i, j in enumerate(np.asarray(accepted)):
            assert_close(got[i], states[j][i], rtol=0, atol=bound, name=f"row {i} after {j}")


# Each case compiles the scan, the commit and the step for its shapes: the default run takes three cases that
# between them cover both dtypes, both decay kinds, shared and per-head groups and a single step (k = 1);
# the hypothesis search over shapes is the -m long twin below.
@pytest.mark.numerics
@pytest.mark.parametrize("seed,batch,k,heads,head_dim,state,shared_group,diagonal,dtype", [
    (1, 2, 5, 2, 3, 2, True, True, jnp.float64),
    (2, 3, 8, 4, 4, 5, False, False, jnp.float32),
    (3, 1, 1, 2, 1, 1, False, True, jnp.float32),
], ids=["f64-diagonal-shared", "f32-scalar-grouped", "f32-one-step"])
def test_commit_every_prefix_equals_steps(seed, batch, k, heads, head_dim, state, shared_group, diagonal, dtype):
    _check_commit_every_prefix(seed, batch, k, heads, head_dim, state, shared_group, diagonal, dtype)


@pytest.mark.long
@pytest.mark.numerics
@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 3), k=st.integers(1, 8), heads=st.sampled_from([1, 2, 4]),
       head_dim=st.sampled_from([1, 3, 4]), state=st.sampled_from([1, 2, 5]), shared_group=st.booleans(),
       diagonal=st.booleans(), dtype=st.sampled_from([jnp.float64, jnp.float32]))
def test_commit_every_prefix_equals_steps_fuzz(seed, batch, k, heads, head_dim, state, shared_group, diagonal,
                                               dtype):
    _check_commit_every_prefix(seed, batch, k, heads, head_dim, state, shared_group, diagonal, dtype)


@pytest.mark.numerics
def test_commit_all_equals_the_scan_and_nothing_is_the_state():
    s0, x, log_a, b, c = _inputs(0, 2, 6, 4, 8, 16, 2, False, jnp.float32)
    _, record = ssd_verify(s0, x, log_a, b, c)
    _, final = ssdkit.ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=s0)
    assert_close(ssd_commit(record, jnp.array([6, 6])), final, rtol=1e-6, name="all k")
    np.testing.assert_array_equal(ssd_commit(record, jnp.array([0, 0])), s0)  # exp(0) = 1 and + 0: exact


# ---------------------------------------------------------------- diagonal plus rank one (the delta-rule family)
# k = 13 steps with test_delta_rule's canonical shapes (2 rows, 2 heads in 1 group, P = 3, N = 4): the scan (chunks
# of 4, initial state, segment ids) and the oracle it compares with are the programs test_delta_rule compiled, so
# each dtype adds only the verify, the commit and the step. Tolerances as there, relative to max |expected|:
# float64 1e-10 (the same sums in another order), float32 1e-5 (the float32 verify/commit against the float64
# oracle of the very same float32 inputs, and against float32 steps).


def _rank_one_case(diagonal, per_head, dtype):
    rng = np.random.default_rng(11)
    p = CANONICAL
    x, log_a, b, c, w, u, s0, _ = make_inputs(rng, batch=p["batch"], seq=p["seq"], groups=p["groups"],
                                              heads=p["groups"] * p["heads_per_group"], hdim=p["hdim"],
                                              state=p["state"], diagonal=diagonal, per_head=per_head, dtype=dtype)
    return s0, x, log_a, b, c, w, u


def _oracle_after(accepted, s0, x, log_a, b, c, w, u):
    """The float64 oracle's state after each row's first accepted[i] steps: the k-step oracle with the steps past
    them made identities (log_a = 0, w = 0, x = 0: A_t = I, no input), one program for every j."""
    keep = np.arange(x.shape[1])[None, :] < np.asarray(accepted)[:, None]  # (batch, k)

    def cut(t):
        return np.where(keep.reshape(keep.shape + (1,) * (t.ndim - 2)), np.asarray(t, np.float64), 0.0)

    with jax.enable_x64(True):
        _, final = ssdkit.ssd_reference(cut(x), cut(log_a), b.astype(np.float64), c.astype(np.float64),
                                        initial_state=s0.astype(np.float64), w=cut(w), u=u.astype(np.float64),
                                        segment_ids=np.zeros(x.shape[:2], np.int32))
    return np.asarray(final)


def _check_rank_one_commit(diagonal, per_head, dtype):
    rtol = F64_RTOL if dtype == np.float64 else F32_RTOL
    s0, x, log_a, b, c, w, u = _rank_one_case(diagonal, per_head, dtype)
    batch, k = x.shape[:2]
    with jax.enable_x64(dtype == np.float64):
        y, record = ssd_verify(s0, x, log_a, b, c, w=w, u=u)
        assert y.dtype == dtype and record.h.shape == x.shape
        y_scan, _ = ssdkit.ssd_scan(x, log_a, b, c, chunk_size=CANONICAL["chunk"], initial_state=s0, w=w, u=u,
                                    segment_ids=np.zeros((batch, k), np.int32))
        ys, states, s = [], [jnp.asarray(s0)], jnp.asarray(s0)
        for t in range(k):
            y_t, s = ssdkit.ssd_step(s, x[:, t], log_a[:, t], b[:, t], c[:, t], w=w[:, t], u=u[:, t])
            ys.append(y_t)
            states.append(s)
        assert_close(y, y_scan, rtol=rtol, name="verified outputs vs the scan")
        assert_close(y, jnp.stack(ys, 1), rtol=rtol, name="verified outputs vs the steps")
        for j in range(k + 1):  # every row the same prefix
            accepted = np.full((batch,), j, np.int32)
            got = ssd_commit(record, accepted)
            assert got.dtype == dtype
            assert_close(got, states[j], rtol=rtol, name=f"state after {j} of {k} vs {j} steps")
            assert_close(got, _oracle_after(accepted, s0, x, log_a, b, c, w, u), rtol=rtol,
                         name=f"state after {j} of {k} vs the oracle")
        np.testing.assert_array_equal(ssd_commit(record, np.zeros((batch,), np.int32)), s0)  # exp(0) = 1 and + 0
        for accepted in ([3, 11], [k, 0]):  # each row its own prefix
            got = ssd_commit(record, np.asarray(accepted, np.int32))
            assert_close(got, _oracle_after(accepted, s0, x, log_a, b, c, w, u), rtol=rtol, name=f"rows {accepted}")
            for i, j in enumerate(accepted):
                assert_close(got[i], states[j][i], rtol=rtol, name=f"row {i} after {j} vs {j} steps")


# Default run: one case per dtype, between them both decay kinds and both rank-one kinds (per group, per head), with
# an initial state; the long twin takes the other two combinations.
@pytest.mark.numerics
@pytest.mark.parametrize(("diagonal", "per_head", "dtype"), [
    (False, False, np.float64),
    (True, True, np.float32),
    pytest.param(True, False, np.float64, marks=pytest.mark.long),
    pytest.param(False, True, np.float32, marks=pytest.mark.long),
], ids=["f64-scalar-groups", "f32-channels-heads", "f64-channels-groups", "f32-scalar-heads"])
def test_rank_one_commit_every_prefix_equals_steps_and_oracle(diagonal, per_head, dtype):
    _check_rank_one_commit(diagonal, per_head, dtype)


def test_rank_one_bad_input_is_named():
    s0, x, log_a, b, c, w, u = _rank_one_case(False, False, np.float32)
    with pytest.raises(ValueError, match=r"one block: chunk_size must be None or >= k, got 4"):
        ssd_verify(s0, x, log_a, b, c, chunk_size=4, w=w, u=u)
    with pytest.raises(ValueError, match="w was given without u"):
        ssd_verify(s0, x, log_a, b, c, w=w)
    with pytest.raises(ValueError, match="holds both h and u"):
        ssd_commit(ScanRecord(state=s0, x=x, log_a=log_a, b=b, h=x), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="record.h must have the shape of record.x"):
        ssd_commit(ScanRecord(state=s0, x=x, log_a=log_a, b=b, h=x[:, :3], u=u), np.zeros(2, np.int32))


@pytest.mark.parametrize("kernel", [1, 2, 4])
def test_conv_commit_every_prefix_equals_steps(kernel):
    batch, k, chan = 3, 5, 6
    rng = np.random.default_rng(kernel)
    window, inputs, weight = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                              for shape in ((batch, kernel - 1, chan), (batch, k, chan), (kernel, chan)))
    windows, w = [window], window
    for t in range(k):
        _, w = ssdkit.causal_conv1d_step(inputs[:, t], weight, None, w)
        windows.append(w)
    for j in range(k + 1):
        np.testing.assert_array_equal(conv_commit(window, inputs, jnp.full((batch,), j)), windows[j])  # data movement
    accepted = jnp.array([0, 5, 2])
    got = conv_commit(window, inputs, accepted)
    for i, j in enumerate(accepted.tolist()):
        np.testing.assert_array_equal(got[i], windows[j][i])


def test_bad_input_is_named():
    s0, x, log_a, b, c = _inputs(0, 2, 3, 2, 2, 2, 1, False, jnp.float32)
    _, record = ssd_verify(s0, x, log_a, b, c)
    with pytest.raises(ValueError, match=r"accepted must lie in 0..3"):
        ssd_commit(record, jnp.array([0, 4]))
    with pytest.raises(ValueError, match=r"accepted must have shape \(batch,\) = \(2,\)"):
        ssd_commit(record, jnp.array([1]))
    with pytest.raises(TypeError):
        ssd_commit(record, jnp.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least one step"):
        ssd_verify(s0, x[:, :0], log_a[:, :0], b[:, :0], c[:, :0])
    with pytest.raises(ValueError, match="window must have shape"):
        conv_commit(jnp.zeros((2, 3)), jnp.zeros((2, 3, 4)), jnp.array([0, 1]))
    assert isinstance(record, ScanRecord)

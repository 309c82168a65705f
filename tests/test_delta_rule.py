"""Diagonal-plus-rank-one transitions (the delta-rule family): the UT-form chunked scan, the step and the
oracle held together, and the published delta-rule recurrences written out against their mappings.

    S_t = S_{t-1} (diag(exp(log_a_t)) + w_t u_tᵀ) + x_t ⊗ b_t        y_t = S_t · c_t

Tolerances (relative to the largest |expected| entry, helpers.assert_close), as in test_scan.py:
* float64: 1e-10; the two paths take the same sums in another order (rounding ~1e-15 here);
* float32: 1e-5 against the float64 oracle on the very same float32 inputs. The UT solve adds a few
  roundings per term (log2 Q products of Q×Q matrices); a missing or misplaced term is O(1).
The rank-one factors are drawn near the delta rule's (``w ≈ -β k``, ``u ≈ k``, unit keys, β in (0, 2)),
so the transitions stay near-contractive over the few dozen steps of these cases.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssdkit import RankOne, Recurrence, ssd_reference, ssd_scan, ssd_step
from ssdkit.core.delta import delta_rule
from ssdkit.core.mesh import sharded_ssd_scan
from tests.helpers import assert_close

F64_RTOL = 1e-10
F32_RTOL = 1e-5

# The shapes several tests share (compiled once per program): 2 rows of 13 steps, 1 group of 2 heads,
# chunks of 4 (three chunks and a ragged tail).
CANONICAL = dict(batch=2, seq=13, groups=1, heads_per_group=2, hdim=3, state=4, chunk=4)


def make_inputs(rng, *, batch, seq, heads, groups, hdim, state, diagonal, per_head, dtype=np.float64,
                with_state=True, with_segments=False):
    """x, log_a, b, c, w, u, initial state, segment ids; w, u per head (H) or per group (G)."""
    x = rng.standard_normal((batch, seq, heads, hdim))
    b = rng.standard_normal((batch, seq, groups, state))
    c = rng.standard_normal((batch, seq, groups, state))
    log_a = -rng.exponential(0.5, (batch, seq, heads, state) if diagonal else (batch, seq, heads))
    width = heads if per_head else groups
    k = rng.standard_normal((batch, seq, width, state))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    beta = rng.uniform(0, 2, (batch, seq, width, 1))
    noise = 0.2 / np.sqrt(state)
    w = -beta * k + noise * rng.standard_normal(k.shape)
    u = k + noise * rng.standard_normal(k.shape)
    s0 = rng.standard_normal((batch, heads, hdim, state)) if with_state else None
    seg = np.cumsum(rng.uniform(size=(batch, seq)) < 0.15, axis=1).astype(np.int32) if with_segments else None
    cast = lambda a: None if a is None else np.asarray(a, dtype)  # noqa: E731
    return cast(x), cast(log_a), cast(b), cast(c), cast(w), cast(u), cast(s0), seg


def _inputs(params, dtype, **overrides):
    rng = np.random.default_rng(params["seed"])
    p = dict(params, **overrides)
    return make_inputs(rng, batch=p["batch"], seq=p["seq"], heads=p["groups"] * p["heads_per_group"],
                       groups=p["groups"], hdim=p["hdim"], state=p["state"], diagonal=p["diagonal"],
                       per_head=p["per_head"], dtype=dtype, with_state=p["with_state"],
                       with_segments=p["with_segments"])


def _cases():
    """H <= 2, P, N <= 8, chunks 1..8, lengths up to 3 chunks plus an odd part (multiples and ragged)."""
    params = st.fixed_dictionaries(
        {
            "batch": st.integers(1, 2),
            "groups_heads": st.sampled_from([(1, 1), (1, 2), (2, 1)]),
            "hdim": st.integers(1, 8),
            "state": st.integers(1, 8),
            "diagonal": st.booleans(),
            "per_head": st.booleans(),
            "with_state": st.booleans(),
            "with_segments": st.booleans(),
            "chunk": st.integers(1, 8),
            "seed": st.integers(0, 2**31 - 1),
        }
    )

    def finish(p):
        groups, per = p.pop("groups_heads")
        return st.integers(1, 3 * p["chunk"] + 5).map(
            lambda seq: p | {"groups": groups, "heads_per_group": per, "seq": seq})

    return params.flatmap(finish)


def _up(a):
    return None if a is None else np.asarray(a, np.float64)


def check_scan_against_reference(params):
    """float64: scan == oracle to F64_RTOL. float32: the scan of float32 inputs against the float64 oracle
    of those very inputs, to F32_RTOL."""
    with jax.enable_x64(True):
        x, log_a, b, c, w, u, s0, seg = _inputs(params, np.float64)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0, segment_ids=seg,
                            w=w, u=u)
        y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg, w=w, u=u)
        assert y.dtype == jnp.float64 and final.dtype == jnp.float64
        assert_close(y, y_ref, rtol=F64_RTOL, name="y")
        assert_close(final, final_ref, rtol=F64_RTOL, name="final_state")
    x, log_a, b, c, w, u, s0, seg = _inputs(params, np.float32)
    y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0, segment_ids=seg, w=w, u=u)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    with jax.enable_x64(True):
        y_ref, final_ref = ssd_reference(_up(x), _up(log_a), _up(b), _up(c), initial_state=_up(s0),
                                         segment_ids=seg, w=_up(w), u=_up(u))
    assert_close(y, y_ref, rtol=F32_RTOL, name="y")
    assert_close(final, final_ref, rtol=F32_RTOL, name="final_state")


def _canonical(diagonal, per_head, **extra):
    return dict(CANONICAL, diagonal=diagonal, per_head=per_head, with_state=True, with_segments=True, seed=5) | extra


# Each example with new shapes compiles three programs; the default run draws two and pins the canonical
# shapes for a scalar decay with per-group w, u and a per-channel decay with per-head w, u (both with an
# initial state and resets), whose programs the step and w = 0 tests below reuse. The long twin draws 30.
@pytest.mark.numerics
@given(params=_cases())
@settings(max_examples=2)
@example(params=_canonical(False, False))
@example(params=_canonical(True, True))
def test_scan_matches_reference(params):
    check_scan_against_reference(params)


@pytest.mark.long
@pytest.mark.numerics
@given(params=_cases())
@settings(max_examples=30)
def test_scan_matches_reference_long(params):
    check_scan_against_reference(params)


@pytest.mark.parametrize(("diagonal", "per_head"), [(False, False), (True, True)])
def test_step_matches_scan(diagonal, per_head):
    """Token-by-token steps from the initial state equal the scan (one document: segment ids all equal, the
    program the pinned oracle examples compiled)."""
    with jax.enable_x64(True):
        x, log_a, b, c, w, u, s0, _ = _inputs(_canonical(diagonal, per_head), np.float64)
        y_scan, final_scan = ssd_scan(x, log_a, b, c, chunk_size=CANONICAL["chunk"], initial_state=s0,
                                      segment_ids=np.zeros(x.shape[:2], np.int32), w=w, u=u)
        step = jax.jit(ssd_step)
        state, ys = s0, []
        for t in range(x.shape[1]):
            y_t, state = step(state, x[:, t], log_a[:, t], b[:, t], c[:, t], w=w[:, t], u=u[:, t])
            ys.append(np.asarray(y_t)[:, None])
        assert_close(np.concatenate(ys, axis=1), y_scan, rtol=F64_RTOL, name="y")
        assert_close(state, final_scan, rtol=F64_RTOL, name="state")


def _grads(fn, x, log_a, b, c, w, u, s0, seg, cot_y, cot_s):
    def loss(x, log_a, b, c, w, u, s0):
        y, final = fn(x, log_a, b, c, w, u, s0, seg)
        return jnp.sum(y * cot_y) + jnp.sum(final * cot_s)

    return jax.grad(loss, argnums=tuple(range(7)))(x, log_a, b, c, w, u, s0)


@pytest.mark.parametrize(("diagonal", "per_head"), [
    (True, False), pytest.param(False, True, marks=pytest.mark.long)])
def test_gradients_match_reference(diagonal, per_head):
    """Gradients of a random linear function of (y, final state) with respect to every input, float64."""
    with jax.enable_x64(True):
        x, log_a, b, c, w, u, s0, seg = _inputs(_canonical(diagonal, per_head), np.float64)
        rng = np.random.default_rng(1)
        cot_y, cot_s = rng.standard_normal(x.shape), rng.standard_normal(s0.shape)

        def scan(x, log_a, b, c, w, u, s0, seg):
            return ssd_scan(x, log_a, b, c, chunk_size=CANONICAL["chunk"], initial_state=s0, segment_ids=seg,
                            w=w, u=u)

        def reference(x, log_a, b, c, w, u, s0, seg):
            return ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg, w=w, u=u)

        got = _grads(scan, x, log_a, b, c, w, u, s0, seg, cot_y, cot_s)
        want = _grads(reference, x, log_a, b, c, w, u, s0, seg, cot_y, cot_s)
        for name, g, e in zip(("x", "log_a", "b", "c", "w", "u", "initial_state"), got, want, strict=True):
            assert_close(g, e, rtol=1e-9, name=f"d/d{name}")


@pytest.mark.numerics
def test_zero_rank_one_term_is_the_diagonal_kind():
    """w = 0 (any u) is today's diagonal recurrence: the rank-one kernel equals the diagonal kernel."""
    with jax.enable_x64(True):
        x, log_a, b, c, w, u, s0, seg = _inputs(_canonical(False, False), np.float64)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=CANONICAL["chunk"], initial_state=s0, segment_ids=seg,
                            w=np.zeros_like(w), u=u)
        y_diag, final_diag = ssd_scan(x, log_a, b, c, chunk_size=CANONICAL["chunk"], initial_state=s0,
                                      segment_ids=seg)
        assert_close(y, y_diag, rtol=1e-12, name="y")
        assert_close(final, final_diag, rtol=1e-12, name="final_state")


def _delta_rule_loop(q, k, v, alpha, beta, s0, scale, decay_first=True):
    """The published recurrences in their own words, float64 numpy, state (V, K) per head:
    Gated DeltaNet / KDA ``S_t = S_{t-1} Diag(α_t) (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ`` (decay first), or
    ``S_t = S_{t-1} (I - β_t k_t k_tᵀ) Diag(α_t) + β_t v_t k_tᵀ`` (decay after the rank-one term);
    ``o_t = S_t (scale · q_t)``. α (batch, seq, H, K) (a scalar gate broadcast), β (batch, seq, H)."""
    batch, seq, heads, dk = k.shape
    s = s0.copy()
    out = np.zeros(v.shape)
    eye = np.eye(dk)
    for t in range(seq):
        for i in range(batch):
            for h in range(heads):
                kt, a = k[i, t, h], np.diag(alpha[i, t, h])
                house = eye - beta[i, t, h] * np.outer(kt, kt)
                transition = a @ house if decay_first else house @ a
                s[i, h] = s[i, h] @ transition + beta[i, t, h] * np.outer(v[i, t, h], kt)
                out[i, t, h] = s[i, h] @ (scale * q[i, t, h])
    return out, s


@pytest.mark.parametrize("kind", ["deltanet", "gated", "kda", "kda_decay_after"])
def test_published_delta_rules_map_onto_the_structure(kind):
    """DeltaNet (no gate), Gated DeltaNet (scalar gate) and KDA (per-channel gate, both orders) written out,
    against ssd_scan with ssdkit.core.delta.delta_rule's mapping: log_a = g, w = -β·(exp(g) ⊙ k), u = k,
    x = v, b = β·k, c = q·scale; decay after the rank-one term: w = -β·k, u = exp(g) ⊙ k. Keys shared by
    the two heads (one group) for DeltaNet, per head otherwise."""
    rng = np.random.default_rng(7)
    batch, seq, heads, dk, dv = 1, 11, 2, 4, 3
    groups = 1 if kind == "deltanet" else heads
    q, k = rng.standard_normal((2, batch, seq, groups, dk))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((batch, seq, heads, dv))
    beta = rng.uniform(0, 1, (batch, seq, heads))
    per_channel = kind.startswith("kda")
    g = -rng.exponential(0.3, (batch, seq, heads, dk) if per_channel else (batch, seq, heads))
    if kind == "deltanet":
        g = None
        alpha = np.ones((batch, seq, heads, dk))
    else:
        alpha = np.exp(g) if per_channel else np.broadcast_to(np.exp(g)[..., None], (batch, seq, heads, dk))
    s0 = rng.standard_normal((batch, heads, dv, dk))
    scale = dk**-0.5
    qh, kh = (np.repeat(a, heads // groups, axis=2) for a in (q, k))
    want_y, want_s = _delta_rule_loop(qh, kh, v, alpha, beta, s0, scale, decay_first=kind != "kda_decay_after")
    with jax.enable_x64(True):
        d = delta_rule(q, k, v, beta, g, order="decay_last" if kind == "kda_decay_after" else "decay_first")
        y, final = ssd_scan(d.x, d.log_a, d.b, d.c, chunk_size=4, initial_state=s0, w=d.w, u=d.u)
        assert_close(y, want_y, rtol=F64_RTOL, name="y")
        assert_close(final, want_s, rtol=F64_RTOL, name="final_state")


def test_delta_rule_checks_its_arguments():
    q = k = np.zeros((1, 3, 2, 4))
    v, beta = np.zeros((1, 3, 4, 5)), np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="order must be one of"):
        delta_rule(q, k, v, beta, order="after")
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, beta[..., :3])
    with pytest.raises(ValueError, match="g must be"):
        delta_rule(q, k, v, beta, np.zeros((1, 3, 4, 3)))


def test_rank_one_inputs_are_checked():
    rng = np.random.default_rng(0)
    x, log_a, b, c, w, u, s0, _ = make_inputs(rng, batch=1, seq=5, heads=4, groups=2, hdim=3, state=4,
                                              diagonal=False, per_head=False)
    assert Recurrence.from_inputs(x, log_a, b, w=w, u=u).rank_one is RankOne.GROUPS
    assert Recurrence.from_inputs(x, log_a, b, w=np.repeat(w, 2, 2), u=np.repeat(u, 2, 2)).rank_one is RankOne.HEADS
    assert Recurrence.from_inputs(x, log_a, b).rank_one is RankOne.NONE
    spec = Recurrence(4, 3, 4, 2, rank_one="heads")
    assert spec.has_rank_one and spec.rank_one_shape(1, 5) == (1, 5, 4, 4)
    hash(spec)
    with pytest.raises(ValueError, match="unknown rank-one kind 'dense'"):
        Recurrence(4, 3, 4, 2, rank_one="dense")
    with pytest.raises(ValueError, match="w was given without u"):
        ssd_scan(x, log_a, b, c, chunk_size=2, w=w)
    with pytest.raises(ValueError, match="w and u must have the same shape"):
        ssd_scan(x, log_a, b, c, chunk_size=2, w=w, u=np.repeat(u, 2, 2))
    with pytest.raises(ValueError, match=r"G=2 \(per group, like b\) or H=4 \(per head\)"):
        ssd_scan(x, log_a, b, c, chunk_size=2, w=w[:, :, :1], u=u[:, :, :1])
    with pytest.raises(ValueError, match=r"w must have shape \(batch, G or H, N\)"):
        ssd_step(s0, x[:, 0], log_a[:, 0], b[:, 0], c[:, 0], w=w, u=u)
    with pytest.raises(ValueError, match=r"w has shape \(1, 5, 2, 3\) but the recurrence .* expects \(1, 5, 2, 4\)"):
        ssd_reference(x, log_a, b, c, w=w[..., :3], u=u[..., :3])
    with pytest.raises(TypeError):
        ssd_scan(x, log_a, b, c, chunk_size=2, w=w.astype(np.int32), u=u.astype(np.int32))
    with pytest.raises(ValueError, match="log_a must be <= 0"):
        ssd_scan(x, -log_a, b, c, chunk_size=2, w=w, u=u)
    # the mesh form called without the recurrence's w, u: refused, never a silent wrong answer
    spec = Recurrence.from_inputs(x, log_a, b, w=w, u=u)
    with pytest.raises(ValueError, match="rank-one kind 'groups' needs w and u"):
        sharded_ssd_scan(spec, x, log_a, b, c, s0, None)

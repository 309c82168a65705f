"""The exclusive readout (``y_t = S_{t-1} c_t``) and the bonus term (``y_t += ((bonus ⊙ c_t)·b_t) x_t``):
chunked scan, step and verify against the float64 oracle, with resets and initial states, and RWKV-6's
published recurrence written out against its mapping (exclusive readout + bonus, per-channel decay).

Tolerances (relative to the largest |expected| entry, helpers.assert_close), as in test_scan.py:
float64 1e-10; float32 1e-5 against the float64 oracle of the same float32 inputs. Tiny shapes (2 rows
of 11 steps, chunks of 4: two chunks and a ragged tail) keep the number of compiled programs small.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssdkit import ssd_commit, ssd_reference, ssd_scan, ssd_step, ssd_verify
from tests.helpers import assert_close

F64_RTOL = 1e-10
F32_RTOL = 1e-5
BATCH, SEQ, GROUPS, HEADS, P, N, CHUNK = 2, 11, 1, 2, 3, 4, 4


def _inputs(seed, *, diagonal, rank_one, bonus, dtype=np.float64, segments=True):
    """x, log_a, b, c, w, u, bonus, initial state, segment ids (float ``dtype``)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, SEQ, HEADS, P))
    b = rng.standard_normal((BATCH, SEQ, GROUPS, N))
    c = rng.standard_normal((BATCH, SEQ, GROUPS, N))
    log_a = -rng.exponential(0.5, (BATCH, SEQ, HEADS, N) if diagonal else (BATCH, SEQ, HEADS))
    w = u = None
    if rank_one:  # near the delta rule: w ≈ -β k, u ≈ k, unit keys
        k = rng.standard_normal((BATCH, SEQ, HEADS, N))
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
        w = -rng.uniform(0, 2, (BATCH, SEQ, HEADS, 1)) * k + 0.1 * rng.standard_normal(k.shape)
        u = k + 0.1 * rng.standard_normal(k.shape)
    bon = {None: None, "head": rng.standard_normal((HEADS, N)),
           "step": rng.standard_normal((BATCH, SEQ, HEADS, N))}[bonus]
    s0 = rng.standard_normal((BATCH, HEADS, P, N))
    seg = None
    if segments:  # resets at fixed places, including one at a chunk start (t = 4) and one mid-chunk
        seg = np.zeros((BATCH, SEQ), np.int32)
        seg[0, 4:] += 1
        seg[0, 9:] += 1
        seg[1, 6:] += 1
    cast = lambda a: None if a is None else np.asarray(a, dtype)  # noqa: E731
    return cast(x), cast(log_a), cast(b), cast(c), cast(w), cast(u), cast(bon), cast(s0), seg


CASES = [  # (decay per channel, rank-one term, bonus layout, readout)
    pytest.param(False, False, "head", "exclusive", id="scalar-exclusive-bonus"),
    pytest.param(True, False, "step", "inclusive", id="diagonal-inclusive-stepbonus"),
    pytest.param(True, False, None, "exclusive", id="diagonal-exclusive"),
    pytest.param(True, True, "head", "exclusive", id="rankone-exclusive-bonus"),
]


@pytest.mark.numerics
@pytest.mark.parametrize(("diagonal", "rank_one", "bonus", "readout"), CASES)
def test_scan_matches_oracle(diagonal, rank_one, bonus, readout):
    x, log_a, b, c, w, u, bon, s0, seg = _inputs(1, diagonal=diagonal, rank_one=rank_one, bonus=bonus)
    with jax.enable_x64(True):
        y, final = ssd_scan(x, log_a, b, c, chunk_size=CHUNK, initial_state=s0, segment_ids=seg, w=w, u=u,
                            bonus=bon, readout=readout)
        y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg, w=w, u=u,
                                         bonus=bon, readout=readout)
        assert_close(y, y_ref, rtol=F64_RTOL, name="y")
        assert_close(final, final_ref, rtol=F64_RTOL, name="final_state")
        if readout == "exclusive":  # t = 0 reads the initial state; a document's first token reads zero
            y0 = np.einsum("bhpn,bn->bhp", s0, c[:, 0, 0])
            if bon is not None:
                bt = bon if bon.ndim == 2 else bon[:, 0]
                y0 = y0 + np.einsum("...hn,bn,bn->bh", bt, b[:, 0, 0], c[:, 0, 0])[..., None] * x[:, 0]
            assert_close(y_ref[:, 0], y0, rtol=F64_RTOL, name="y_0")
            if bon is None:
                assert np.all(np.asarray(y_ref)[0, 4] == 0) and np.all(np.asarray(y_ref)[1, 6] == 0)
    f32 = [None if t is None else t.astype(np.float32) for t in (x, log_a, b, c, w, u, bon, s0)]
    y32, final32 = ssd_scan(*f32[:4], chunk_size=CHUNK, initial_state=f32[7], segment_ids=seg, w=f32[4],
                            u=f32[5], bonus=f32[6], readout=readout)
    assert y32.dtype == np.float32
    with jax.enable_x64(True):
        up = [None if t is None else np.asarray(t, np.float64) for t in f32]
        y_ref, final_ref = ssd_reference(*up[:4], initial_state=up[7], segment_ids=seg, w=up[4], u=up[5],
                                         bonus=up[6], readout=readout)
    assert_close(y32, y_ref, rtol=F32_RTOL, name="y float32")
    assert_close(final32, final_ref, rtol=F32_RTOL, name="final_state float32")


@pytest.mark.numerics
@pytest.mark.parametrize("rank_one", [False, True], ids=["diagonal", "rankone"])
def test_step_and_verify_match_scan(rank_one):
    """k steps (RWKV-6's layout: exclusive + per-head bonus) by ssd_step, by ssd_verify, and by ssd_scan."""
    x, log_a, b, c, w, u, bon, s0, _ = _inputs(2, diagonal=True, rank_one=rank_one, bonus="head", segments=False)
    kw = dict(bonus=bon, readout="exclusive")
    with jax.enable_x64(True):
        y_scan, final = ssd_scan(x, log_a, b, c, chunk_size=CHUNK, initial_state=s0, w=w, u=u, **kw)
        state, ys = s0, []
        for t in range(SEQ):
            wt, ut = (None, None) if w is None else (w[:, t], u[:, t])
            y_t, state = ssd_step(state, x[:, t], log_a[:, t], b[:, t], c[:, t], w=wt, u=ut, **kw)
            ys.append(y_t)
        assert_close(np.stack(ys, 1), y_scan, rtol=F64_RTOL, name="step y")
        assert_close(state, final, rtol=F64_RTOL, name="step state")
        y_ver, record = ssd_verify(s0, x, log_a, b, c, w=w, u=u, **kw)
        assert_close(y_ver, y_scan, rtol=F64_RTOL, name="verify y")
        assert_close(ssd_commit(record, np.full((BATCH,), SEQ, np.int32)), final, rtol=F64_RTOL, name="commit")


@pytest.mark.numerics
def test_rwkv6_mapping():
    """RWKV-6's wkv, as published (per head, state S (K, V), decay w_t = exp(-exp(ω_t)) per key channel)::

        o_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t)        S_t = diag(w_t) S_{t-1} + k_tᵀ v_t

    maps to ``x = v, b = k, c = r, log_a = -exp(ω), bonus = u, readout="exclusive"`` (our state is Sᵀ);
    documents restart from a zero state.
    """
    rng = np.random.default_rng(3)
    r, k, v = (rng.standard_normal((BATCH, SEQ, HEADS, d)) for d in (N, N, P))
    omega = rng.standard_normal((BATCH, SEQ, HEADS, N)) - 1.0
    bonus = rng.standard_normal((HEADS, N))
    s0 = rng.standard_normal((BATCH, HEADS, N, P))  # RWKV layout (K, V)
    seg = np.zeros((BATCH, SEQ), np.int32)
    seg[1, 5:] = 1
    out = np.zeros((BATCH, SEQ, HEADS, P))
    for i in range(BATCH):
        for h in range(HEADS):
            s = s0[i, h].copy()
            for t in range(SEQ):
                if t > 0 and seg[i, t] != seg[i, t - 1]:
                    s = np.zeros_like(s)
                kv = np.outer(k[i, t, h], v[i, t, h])
                out[i, t, h] = r[i, t, h] @ (s + bonus[h][:, None] * kv)
                s = np.exp(-np.exp(omega[i, t, h]))[:, None] * s + kv
            if i == 0 and h == 0:
                last = s
    with jax.enable_x64(True):  # one group per head: b, c (batch, seq, H, N)
        kw = dict(initial_state=np.swapaxes(s0, -1, -2), segment_ids=seg, bonus=bonus, readout="exclusive")
        y, final = ssd_scan(v, -np.exp(omega), k, r, chunk_size=CHUNK, **kw)
        y_ref, _ = ssd_reference(v, -np.exp(omega), k, r, **kw)
    assert_close(y, out, rtol=F64_RTOL, name="scan vs RWKV-6")
    assert_close(y_ref, out, rtol=F64_RTOL, name="oracle vs RWKV-6")
    assert_close(np.asarray(final)[0, 0].T, last, rtol=F64_RTOL, name="final state")


def test_arguments_checked():
    x, log_a, b, c, _, _, bon, s0, _ = _inputs(4, diagonal=False, rank_one=False, bonus="head", segments=False)
    with pytest.raises(ValueError, match="readout must be"):
        ssd_scan(x, log_a, b, c, chunk_size=CHUNK, readout="shifted")
    with pytest.raises(ValueError, match="bonus must have shape"):
        ssd_scan(x, log_a, b, c, chunk_size=CHUNK, bonus=bon[:, :2])
    with pytest.raises(ValueError, match="bonus must have shape"):
        ssd_step(s0, x[:, 0], log_a[:, 0], b[:, 0], c[:, 0], bonus=np.ones((BATCH, SEQ, HEADS, N), np.float32))
    with pytest.raises(TypeError):
        ssd_reference(x, log_a, b, c, bonus=np.ones((HEADS, N), np.int32))
    with pytest.raises(ValueError, match="readout must be"):
        ssd_verify(s0, x, log_a, b, c, readout=None)

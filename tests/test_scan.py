"""The chunked scan and the O(1) step against the sequential oracle.

Tolerances (relative to the largest |expected| entry, see helpers.assert_close):
* float64: 1e-10. Both paths compute the same sums in a different order; with O(1) inputs and a few
  hundred steps the rounding is ~1e-14, so 1e-10 leaves margin without hiding a wrong term.
* float32: 2e-5 against the float64 oracle on the same inputs. One float32 rounding per term of a sum
  of up to a few hundred decayed terms gives ~1e-6 relative error; a missing or misplaced term is O(1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssdkit import Recurrence, preferred_chunk_size, ssd_reference, ssd_scan, ssd_step
from tests.helpers import assert_close

# Compares floats from compiled programs: rerun with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (README).
pytestmark = pytest.mark.numerics

F64_RTOL = 1e-10
F32_RTOL = 2e-5

CHUNKS = [1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128, 256]


def make_inputs(rng, *, batch, seq, heads, groups, hdim, state, diagonal, dtype=np.float64,
                with_state=True, with_segments=False, decay_scale=1.0):
    x = rng.standard_normal((batch, seq, heads, hdim))
    b = rng.standard_normal((batch, seq, groups, state))
    c = rng.standard_normal((batch, seq, groups, state))
    shape = (batch, seq, heads, state) if diagonal else (batch, seq, heads)
    log_a = -decay_scale * rng.exponential(0.5, shape)
    s0 = rng.standard_normal((batch, heads, hdim, state)) if with_state else None
    seg = None
    if with_segments:
        seg = jnp.asarray(np.cumsum(rng.uniform(size=(batch, seq)) < 0.15, axis=1), jnp.int32)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
    return cast(x), cast(log_a), cast(b), cast(c), cast(s0), seg


shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "groups": st.sampled_from([1, 2]),
        "heads_per_group": st.sampled_from([1, 3]),
        "hdim": st.integers(1, 4),
        "state": st.integers(1, 5),
        "diagonal": st.booleans(),
        "with_state": st.booleans(),
        "with_segments": st.booleans(),
        "chunk": st.sampled_from(CHUNKS),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _draw_seq(data, chunk):
    # Lengths shorter than a chunk, exact multiples and ragged tails, up to 3 chunks plus an odd part
    # (capped so the sequential oracle stays fast).
    return data.draw(st.integers(1, min(3 * chunk + 5, 300)), label="seq")


def _run(params, seq, dtype):
    rng = np.random.default_rng(params["seed"])
    x, log_a, b, c, s0, seg = make_inputs(
        rng, batch=params["batch"], seq=seq, heads=params["groups"] * params["heads_per_group"],
        groups=params["groups"], hdim=params["hdim"], state=params["state"],
        diagonal=params["diagonal"], dtype=dtype, with_state=params["with_state"],
        with_segments=params["with_segments"],
    )
    return x, log_a, b, c, s0, seg


@given(params=shapes, data=st.data())
def test_scan_matches_reference_float64(params, data):
    seq = _draw_seq(data, params["chunk"])
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = _run(params, seq, np.float64)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0,
                            segment_ids=seg)
        y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)
        assert y.dtype == jnp.float64 and final.dtype == jnp.float64
        assert_close(y, y_ref, rtol=F64_RTOL, name="y")
        assert_close(final, final_ref, rtol=F64_RTOL, name="final_state")


@given(params=shapes, data=st.data())
def test_scan_matches_reference_float32(params, data):
    seq = _draw_seq(data, params["chunk"])
    x, log_a, b, c, s0, seg = _run(params, seq, np.float32)
    y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0, segment_ids=seg)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    with jax.enable_x64(True):  # the oracle in float64 on the very same float32 inputs
        up = lambda a: None if a is None else jnp.asarray(np.asarray(a), jnp.float64)  # noqa: E731
        y_ref, final_ref = ssd_reference(up(x), up(log_a), up(b), up(c), initial_state=up(s0),
                                         segment_ids=seg)
    assert_close(y, y_ref, rtol=F32_RTOL, name="y")
    assert_close(final, final_ref, rtol=F32_RTOL, name="final_state")


@pytest.mark.parametrize("diagonal", [False, True])
def test_result_independent_of_chunk_size(rng, diagonal):
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = make_inputs(rng, batch=2, seq=70, heads=4, groups=2, hdim=3, state=4,
                                              diagonal=diagonal, with_segments=True)
        outs = [ssd_scan(x, log_a, b, c, chunk_size=q, initial_state=s0, segment_ids=seg)
                for q in (1, 6, 16, 64, 128)]
        for y, final in outs[1:]:
            assert_close(y, outs[0][0], rtol=1e-12, name="y")
            assert_close(final, outs[0][1], rtol=1e-12, name="final_state")


def test_preferred_chunk_size_caps_only_on_cpu():
    """The speed choice: at most 64 on CPU, the model's own chunk elsewhere; the result is chunk-independent
    (test_result_independent_of_chunk_size)."""
    assert preferred_chunk_size(256, "cpu") == 64
    assert preferred_chunk_size(16, "cpu") == 16
    assert preferred_chunk_size(256, "gpu") == 256
    assert preferred_chunk_size(256, "tpu") == 256
    assert preferred_chunk_size(256) == preferred_chunk_size(256, jax.default_backend())
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        preferred_chunk_size(0)


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("split", [1, 13, 32])
def test_prefill_then_steps_equals_one_scan(rng, diagonal, split):
    """Scan a prefix, then step token by token from its final state: equal to one long scan."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, _ = make_inputs(rng, batch=2, seq=40, heads=6, groups=3, hdim=2, state=3,
                                            diagonal=diagonal)
        y_full, final_full = ssd_scan(x, log_a, b, c, chunk_size=8, initial_state=s0)
        y_pre, state = ssd_scan(x[:, :split], log_a[:, :split], b[:, :split], c[:, :split],
                                chunk_size=8, initial_state=s0)
        ys = [y_pre]
        step = jax.jit(ssd_step)
        for t in range(split, x.shape[1]):
            y_t, state = step(state, x[:, t], log_a[:, t], b[:, t], c[:, t])
            ys.append(y_t[:, None])
        assert_close(jnp.concatenate(ys, axis=1), y_full, rtol=F64_RTOL, name="y")
        assert_close(state, final_full, rtol=F64_RTOL, name="state")


def test_chunked_prefill_continues_from_state(rng):
    """Two scans chained through the final state equal one scan (chunked prefill)."""
    with jax.enable_x64(True):
        x, log_a, b, c, _, _ = make_inputs(rng, batch=1, seq=50, heads=2, groups=1, hdim=3, state=4,
                                           diagonal=False, with_state=False)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=16)
        y1, s1 = ssd_scan(x[:, :23], log_a[:, :23], b[:, :23], c[:, :23], chunk_size=16)
        y2, s2 = ssd_scan(x[:, 23:], log_a[:, 23:], b[:, 23:], c[:, 23:], chunk_size=16,
                          initial_state=s1)
        assert_close(jnp.concatenate([y1, y2], 1), y, rtol=F64_RTOL, name="y")
        assert_close(s2, final, rtol=F64_RTOL, name="state")


@pytest.mark.parametrize("diagonal", [False, True])
def test_segment_ids_equal_separate_documents(rng, diagonal):
    """Packed documents: each segment behaves as its own sequence (the first one continues s0)."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, _ = make_inputs(rng, batch=1, seq=30, heads=2, groups=1, hdim=2, state=3,
                                            diagonal=diagonal)
        bounds = [0, 7, 8, 21, 30]
        seg = jnp.asarray(np.repeat(np.arange(4), np.diff(bounds))[None], jnp.int32)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=s0, segment_ids=seg)
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            y_doc, f_doc = ssd_reference(x[:, lo:hi], log_a[:, lo:hi], b[:, lo:hi], c[:, lo:hi],
                                         initial_state=s0 if i == 0 else None)
            assert_close(y[:, lo:hi], y_doc, rtol=F64_RTOL, name=f"y of document {i}")
        assert_close(final, f_doc, rtol=F64_RTOL, name="final_state")


@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_gradients_match_reference(rng, diagonal, segments):
    """Reverse-mode gradients of the scan equal those of the oracle (random cotangents, float64)."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = make_inputs(rng, batch=2, seq=19, heads=4, groups=2, hdim=3,
                                              state=2, diagonal=diagonal, with_segments=segments)
        gy = jnp.asarray(rng.standard_normal(x.shape))
        gs = jnp.asarray(rng.standard_normal(s0.shape))

        def loss(fn, *args):
            y, final = fn(*args)
            return jnp.sum(y * gy) + jnp.sum(final * gs)

        def scan_fn(x, log_a, b, c, s0):
            return ssd_scan(x, log_a, b, c, chunk_size=5, initial_state=s0, segment_ids=seg)

        def ref_fn(x, log_a, b, c, s0):
            return ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)

        args = (x, log_a, b, c, s0)
        g_scan = jax.grad(lambda *a: loss(scan_fn, *a), argnums=range(5))(*args)
        g_ref = jax.grad(lambda *a: loss(ref_fn, *a), argnums=range(5))(*args)
        for name, gs_, gr_ in zip(("x", "log_a", "b", "c", "initial_state"), g_scan, g_ref,
                                  strict=True):
            assert_close(gs_, gr_, rtol=1e-9, name=f"d/d{name}")


def test_strong_decay_is_stable(rng):
    """|Σ log_a| over a chunk in the thousands: no overflow, no NaN, still equal to the oracle."""
    x, log_a, b, c, s0, seg = make_inputs(rng, batch=1, seq=300, heads=2, groups=1, hdim=2, state=3,
                                          diagonal=False, dtype=np.float32, decay_scale=20.0,
                                          with_segments=True)
    y, final = ssd_scan(x, log_a, b, c, chunk_size=256, initial_state=s0, segment_ids=seg)
    y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)
    assert_close(y, y_ref, rtol=F32_RTOL, name="y")
    assert_close(final, final_ref, rtol=F32_RTOL, name="final_state")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_keep_float32_state(rng, dtype):
    x, log_a, b, c, s0, _ = make_inputs(rng, batch=1, seq=33, heads=2, groups=1, hdim=4, state=4,
                                        diagonal=False, dtype=np.float32)
    y32, f32 = ssd_scan(x, log_a, b, c, chunk_size=8, initial_state=s0)
    half = [a.astype(dtype) for a in (x, log_a, b, c)]
    y, final = ssd_scan(*half, chunk_size=8, initial_state=s0)
    assert y.dtype == dtype and final.dtype == jnp.float32
    # Inputs rounded to 8 (bf16) / 11 (f16) significant bits: ~1e-2 relative is the expected error.
    assert_close(y, y32, rtol=5e-2, name="y")
    assert_close(final, f32, rtol=5e-2, name="final_state")
    y_step, s_step = ssd_step(s0, *(a[:, 0] for a in half))
    assert y_step.dtype == dtype and s_step.dtype == jnp.float32


def _flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["flops"])


def test_step_cost_is_constant_and_small():
    """XLA's cost analysis: a step costs O(B·H·P·N), far below scanning even one chunk."""
    bsz, h, p, n = 1, 8, 16, 32
    args = [jnp.zeros((bsz, h, p, n)), jnp.zeros((bsz, h, p)), jnp.zeros((bsz, h)),
            jnp.zeros((bsz, 1, n)), jnp.zeros((bsz, 1, n))]
    step_flops = _flops(ssd_step, *args)
    assert step_flops <= 8 * bsz * h * p * n, step_flops
    for q in (16, 64, 256):
        seq_args = [jnp.zeros((bsz, q, h, p)), jnp.zeros((bsz, q, h)), jnp.zeros((bsz, q, 1, n)),
                    jnp.zeros((bsz, q, 1, n))]
        chunk_flops = _flops(lambda *a, q=q: ssd_scan(*a, chunk_size=q), *seq_args)
        assert step_flops * 4 < chunk_flops, (q, step_flops, chunk_flops)


def test_scan_cost_is_linear_in_chunks():
    """No dense (chunks × chunks) term: FLOPs for 32 chunks are ~4x those for 8 chunks."""
    def flops_for(seq):
        args = [jnp.zeros((1, seq, 4, 8)), jnp.zeros((1, seq, 4)), jnp.zeros((1, seq, 1, 8)),
                jnp.zeros((1, seq, 1, 8))]
        return _flops(lambda *a: ssd_scan(*a, chunk_size=16), *args)

    ratio = flops_for(32 * 16) / flops_for(8 * 16)
    assert 3.9 <= ratio <= 4.1, ratio


# ----------------------------------------------------------------------------- bad inputs
def _good(seq=8, heads=4, groups=2):
    return (jnp.zeros((2, seq, heads, 3)), jnp.zeros((2, seq, heads)), jnp.zeros((2, seq, groups, 5)),
            jnp.zeros((2, seq, groups, 5)))


def test_bad_inputs_raise_clear_errors():
    x, log_a, b, c = _good()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, H, P\)"):
        ssd_scan(x[0], log_a, b, c, chunk_size=4)
    with pytest.raises(ValueError, match="log_a must have 3 axes"):
        ssd_scan(x, log_a[..., None, None], b, c, chunk_size=4)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_scan(*_good(heads=3, groups=2), chunk_size=4)
    with pytest.raises(TypeError, match="x must be a floating array"):
        ssd_scan(x.astype(jnp.int32), log_a, b, c, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        ssd_scan(x, log_a, b, c, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        ssd_scan(x, log_a, b, c, chunk_size=2.5)
    with pytest.raises(ValueError, match="b has shape"):
        ssd_scan(x, log_a, b[:1], c, chunk_size=4)
    with pytest.raises(ValueError, match="c has shape"):
        ssd_scan(x, log_a, b, c[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="log_a must be <= 0"):
        ssd_scan(x, log_a + 0.5, b, c, chunk_size=4)
    with pytest.raises(ValueError, match="log_a must be <= 0"):
        ssd_scan(x, log_a.at[0, 0, 0].set(jnp.nan), b, c, chunk_size=4)
    with pytest.raises(ValueError, match="recurrent state must have shape"):
        ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=jnp.zeros((2, 4, 3, 4)))
    with pytest.raises(TypeError, match="recurrent state must be float32"):
        ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=jnp.zeros((2, 4, 3, 5), jnp.bfloat16))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        ssd_scan(x, log_a, b, c, chunk_size=4, segment_ids=jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, seq\)"):
        ssd_scan(x, log_a, b, c, chunk_size=4, segment_ids=jnp.zeros((2, 7), jnp.int32))
    with pytest.raises(ValueError, match="ssd_step needs a state"):
        ssd_step(None, x[:, 0], log_a[:, 0], b[:, 0], c[:, 0])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, H, P\)"):
        ssd_step(jnp.zeros((2, 4, 3, 5)), x, log_a[:, 0], b[:, 0], c[:, 0])


def test_recurrence_spec_validation():
    spec = Recurrence(num_heads=6, head_dim=4, state_dim=8, num_groups=3, decay="diagonal")
    assert spec.heads_per_group == 2 and spec.group_of(5) == 2
    assert spec.log_decay_shape(2, 7) == (2, 7, 6, 8)
    assert spec.init_state(3).shape == (3, 6, 4, 8) and spec.init_state(3).dtype == jnp.float32
    hash(spec)  # usable as a static jit argument
    with pytest.raises(ValueError, match="multiple of num_groups"):
        Recurrence(num_heads=6, head_dim=4, state_dim=8, num_groups=4)
    with pytest.raises(ValueError, match="unknown decay kind 'banded'"):
        Recurrence(num_heads=6, head_dim=4, state_dim=8, decay="banded")
    with pytest.raises(ValueError, match="head_dim must be a positive integer"):
        Recurrence(num_heads=6, head_dim=0, state_dim=8)

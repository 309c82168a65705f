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
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssdkit import Recurrence, preferred_chunk_size, ssd_reference, ssd_scan, ssd_step
from tests.helpers import assert_close

# The tests marked numerics compare float32 results of compiled programs within a few times their expected
# rounding: the README reruns them with XLA_FLAGS=--xla_cpu_max_isa=AVX2. The float64 comparisons below have
# bounds (1e-9..1e-12) three or more orders of magnitude above the float64 rounding of these sums, which a
# change of vectorisation or FMA contraction (a few ulps) cannot reach.

F64_RTOL = 1e-10
F32_RTOL = 2e-5

CHUNKS = [1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 128, 256]

# The shapes most tests here share (compiled once per program): 2 rows of 70 steps, 2 groups of 3 heads.
CANONICAL = dict(batch=2, seq=70, groups=2, heads_per_group=3, hdim=3, state=4)


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
        seg = np.cumsum(rng.uniform(size=(batch, seq)) < 0.15, axis=1).astype(np.int32)
    # numpy arrays: slicing them on the host compiles nothing (a jax slice compiles a program per index)
    cast = lambda a: None if a is None else np.asarray(a, dtype)  # noqa: E731
    return cast(x), cast(log_a), cast(b), cast(c), cast(s0), seg


def _cases():
    """Shapes, flags and a seed, then a length: shorter than a chunk, exact multiples and ragged tails, up
    to 3 chunks plus an odd part (capped so the sequential oracle stays fast)."""
    params = st.fixed_dictionaries(
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
    return params.flatmap(lambda p: st.integers(1, min(3 * p["chunk"] + 5, 300)).map(lambda seq: p | {"seq": seq}))


def _run(params, dtype):
    rng = np.random.default_rng(params["seed"])
    x, log_a, b, c, s0, seg = make_inputs(
        rng, batch=params["batch"], seq=params["seq"], heads=params["groups"] * params["heads_per_group"],
        groups=params["groups"], hdim=params["hdim"], state=params["state"],
        diagonal=params["diagonal"], dtype=dtype, with_state=params["with_state"],
        with_segments=params["with_segments"],
    )
    return x, log_a, b, c, s0, seg


def check_scan_against_reference(params):
    """float64: the scan equals the oracle to F64_RTOL. float32: the scan of the same inputs rounded to
    float32 equals the float64 oracle run on those very float32 inputs to F32_RTOL."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = _run(params, np.float64)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0,
                            segment_ids=seg)
        y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)
        assert y.dtype == jnp.float64 and final.dtype == jnp.float64
        assert_close(y, y_ref, rtol=F64_RTOL, name="y")
        assert_close(final, final_ref, rtol=F64_RTOL, name="final_state")
    x, log_a, b, c, s0, seg = _run(params, np.float32)
    y, final = ssd_scan(x, log_a, b, c, chunk_size=params["chunk"], initial_state=s0, segment_ids=seg)
    assert y.dtype == jnp.float32 and final.dtype == jnp.float32
    with jax.enable_x64(True):  # the oracle in float64 on the very same float32 inputs (compiled above)
        up = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
        y_ref, final_ref = ssd_reference(up(x), up(log_a), up(b), up(c), initial_state=up(s0),
                                         segment_ids=seg)
    assert_close(y, y_ref, rtol=F32_RTOL, name="y")
    assert_close(final, final_ref, rtol=F32_RTOL, name="final_state")


# Each example with new shapes compiles three programs (~3 CPU-s), so the default run draws two (the
# derandomised first draw is the smallest case: one step, chunks of 1) and pins two that share their float64
# scans with test_result_independent_of_chunk_size (CANONICAL shapes): a diagonal decay in the sub-block path
# (chunk 64, ragged tail) and a scalar one with groups (chunk 16), both with an initial state and segments.
# The long twin draws 40 (the float64 and float32 tests it replaces drew 20 each).
def _canonical_case(diagonal, chunk):
    return dict(CANONICAL, diagonal=diagonal, with_state=True, with_segments=True, chunk=chunk, seed=11)


@pytest.mark.numerics
@given(params=_cases())
@settings(max_examples=2)
@example(params=_canonical_case(True, 64))
@example(params=_canonical_case(False, 16))
def test_scan_matches_reference(params):
    check_scan_against_reference(params)


@pytest.mark.long
@pytest.mark.numerics
@given(params=_cases())
@settings(max_examples=40)
def test_scan_matches_reference_long(params):
    check_scan_against_reference(params)


def canonical_inputs(rng, diagonal, *, with_segments=True):
    """float64 inputs of the CANONICAL shapes, with an initial state (and segments)."""
    c = CANONICAL
    return make_inputs(rng, batch=c["batch"], seq=c["seq"], heads=c["groups"] * c["heads_per_group"],
                       groups=c["groups"], hdim=c["hdim"], state=c["state"], diagonal=diagonal,
                       with_segments=with_segments)


def _independent_of_chunk_size(rng, diagonal, chunks):
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = canonical_inputs(rng, diagonal)
        outs = [ssd_scan(x, log_a, b, c, chunk_size=q, initial_state=s0, segment_ids=seg) for q in chunks]
        for y, final in outs[1:]:
            assert_close(y, outs[0][0], rtol=1e-12, name="y")
            assert_close(final, outs[0][1], rtol=1e-12, name="final_state")


@pytest.mark.parametrize("diagonal", [False, True])
def test_result_independent_of_chunk_size(rng, diagonal):
    """70 steps: one step per chunk, a ragged tail of chunks of 16 (the plain decay matrix) and of 64 (the
    sub-block decay matrix)."""
    _independent_of_chunk_size(rng, diagonal, (1, 16, 64))


@pytest.mark.long  # more chunk sizes through the same two paths
@pytest.mark.parametrize("diagonal", [False, True])
def test_result_independent_of_chunk_size_more_chunks(rng, diagonal):
    _independent_of_chunk_size(rng, diagonal, (1, 6, 16, 64, 128))


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


def _one_long_scan(x, log_a, b, c, s0):
    """One scan of the whole canonical sequence as one document (segment ids all equal: no reset), which is
    the program test_result_independent_of_chunk_size compiles for chunks of 16."""
    return ssd_scan(x, log_a, b, c, chunk_size=16, initial_state=s0, segment_ids=np.zeros(x.shape[:2], np.int32))


def _prefill_then_steps(rng, diagonal, split):
    """Scan a prefix, then step token by token from its final state: equal to one long scan."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, _ = canonical_inputs(rng, diagonal, with_segments=False)
        y_full, final_full = _one_long_scan(x, log_a, b, c, s0)
        y_pre, state = ssd_scan(x[:, :split], log_a[:, :split], b[:, :split], c[:, :split],
                                chunk_size=16, initial_state=s0)
        ys = [y_pre]
        step = jax.jit(ssd_step)
        for t in range(split, x.shape[1]):
            y_t, state = step(state, x[:, t], log_a[:, t], b[:, t], c[:, t])
            ys.append(np.asarray(y_t)[:, None])
        assert_close(np.concatenate(ys, axis=1), y_full, rtol=F64_RTOL, name="y")
        assert_close(state, final_full, rtol=F64_RTOL, name="state")


# A ragged prefix (23: one chunk of 16 and 7) for both decay kinds; a one-token prefix (shorter than a
# chunk) and an exact multiple of the chunk (32) are long (the same path: test_scan_matches_reference draws
# such lengths against the oracle).
@pytest.mark.parametrize(("diagonal", "split"), [
    (False, 23), (True, 23),
    *(pytest.param(d, n, marks=pytest.mark.long) for d, n in [(False, 1), (True, 1), (False, 32), (True, 32)]),
])
def test_prefill_then_steps_equals_one_scan(rng, diagonal, split):
    _prefill_then_steps(rng, diagonal, split)


@pytest.mark.parametrize("diagonal", [False, pytest.param(True, marks=pytest.mark.long)])
def test_chunked_prefill_continues_from_state(rng, diagonal):
    """Two scans chained through the final state equal one scan (chunked prefill)."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, _ = canonical_inputs(rng, diagonal, with_segments=False)
        y, final = _one_long_scan(x, log_a, b, c, s0)
        y1, s1 = ssd_scan(x[:, :23], log_a[:, :23], b[:, :23], c[:, :23], chunk_size=16, initial_state=s0)
        y2, s2 = ssd_scan(x[:, 23:], log_a[:, 23:], b[:, 23:], c[:, 23:], chunk_size=16,
                          initial_state=s1)
        assert_close(np.concatenate([y1, y2], 1), y, rtol=F64_RTOL, name="y")
        assert_close(s2, final, rtol=F64_RTOL, name="state")


@pytest.mark.parametrize("diagonal", [False, True])
def test_segment_ids_equal_separate_documents(rng, diagonal):
    """Packed documents: each segment behaves as its own sequence (the first one continues s0).

    Documents of 7, 1, 13, 11 and 38 steps in chunks of 16 (one starts on a chunk boundary, 32). The
    oracle runs every document alone, all in one batch: the first document of each row from s0, padded
    at its end (causal: the padding does not touch its outputs); every later one from a zero state,
    padded at its start with x = b = 0, which keeps the state exactly zero until the document begins, so
    its outputs and final state are those of the document alone."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, _ = canonical_inputs(rng, diagonal, with_segments=False)
        batch, seq = x.shape[:2]
        bounds = [0, 7, 8, 21, 32, seq]
        seg = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))[None].repeat(batch, 0).astype(np.int32)
        y, final = ssd_scan(x, log_a, b, c, chunk_size=16, initial_state=s0, segment_ids=seg)
        y, final = np.asarray(y), np.asarray(final)
        width = max(np.diff(bounds))
        docs = [(row, i, lo, hi) for row in range(batch)
                for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        alone = [np.zeros((len(docs), width) + np.shape(a)[2:]) for a in (x, log_a, b, c)]
        alone_s0 = np.zeros((len(docs),) + s0.shape[1:])
        for n, (row, i, lo, hi) in enumerate(docs):
            at = slice(0, hi - lo) if i == 0 else slice(width - (hi - lo), width)
            for dst, src in zip(alone, (x, log_a, b, c), strict=True):
                dst[n, at] = src[row, lo:hi]
            if i == 0:
                alone_s0[n] = s0[row]
        y_doc, f_doc = (np.asarray(a) for a in ssd_reference(*alone, initial_state=alone_s0))
        for n, (row, i, lo, hi) in enumerate(docs):
            at = slice(0, hi - lo) if i == 0 else slice(width - (hi - lo), width)
            assert_close(y[row, lo:hi], y_doc[n, at], rtol=F64_RTOL, name=f"y of row {row} document {i}")
            if i == len(bounds) - 2:
                assert_close(final[row], f_doc[n], rtol=F64_RTOL, name=f"final_state of row {row}")


def _gradients_match_reference(rng, diagonal, segments):
    """Reverse-mode gradients of the scan equal those of the oracle (random cotangents, float64)."""
    with jax.enable_x64(True):
        x, log_a, b, c, s0, seg = make_inputs(rng, batch=2, seq=19, heads=4, groups=2, hdim=3,
                                              state=2, diagonal=diagonal, with_segments=segments)
        gy = rng.standard_normal(x.shape)
        gs = rng.standard_normal(s0.shape)

        def loss(fn, *args):
            y, final = fn(*args)
            return jnp.sum(y * gy) + jnp.sum(final * gs)

        def scan_fn(x, log_a, b, c, s0):
            return ssd_scan(x, log_a, b, c, chunk_size=5, initial_state=s0, segment_ids=seg)

        def ref_fn(x, log_a, b, c, s0):
            return ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)

        args = (x, log_a, b, c, s0)
        # each gradient as one compiled program (an eager grad compiles every op outside the scan)
        g_scan = jax.jit(jax.grad(lambda *a: loss(scan_fn, *a), argnums=range(5)))(*args)
        g_ref = jax.jit(jax.grad(lambda *a: loss(ref_fn, *a), argnums=range(5)))(*args)
        for name, gs_, gr_ in zip(("x", "log_a", "b", "c", "initial_state"), g_scan, g_ref,
                                  strict=True):
            assert_close(gs_, gr_, rtol=1e-9, name=f"d/d{name}")


# The diagonal decay with segments (the resets' huge negative log-decays inside the exponentials: where a
# gradient could turn NaN) by default; each combination is a ~3 CPU-s compile: the other three are long
# (the scalar decay's gradients are also compared, through a whole Mamba-2, with torch's autograd by
# test_mamba2_parity.py::test_loss_and_gradients_match_torch_autograd).
@pytest.mark.parametrize(("diagonal", "segments"), [
    (True, True),
    *(pytest.param(d, g, marks=pytest.mark.long) for d, g in [(False, False), (False, True), (True, False)]),
])
def test_gradients_match_reference(rng, diagonal, segments):
    _gradients_match_reference(rng, diagonal, segments)


@pytest.mark.numerics  # float32 against the oracle where nearly every decay underflows
def test_strong_decay_is_stable(rng):
    """|Σ log_a| over a chunk in the thousands: no overflow, no NaN, still equal to the oracle."""
    x, log_a, b, c, s0, seg = make_inputs(rng, batch=1, seq=300, heads=2, groups=1, hdim=2, state=3,
                                          diagonal=False, dtype=np.float32, decay_scale=20.0,
                                          with_segments=True)
    y, final = ssd_scan(x, log_a, b, c, chunk_size=256, initial_state=s0, segment_ids=seg)
    y_ref, final_ref = ssd_reference(x, log_a, b, c, initial_state=s0, segment_ids=seg)
    assert_close(y, y_ref, rtol=F32_RTOL, name="y")
    assert_close(final, final_ref, rtol=F32_RTOL, name="final_state")


# float16 takes the same path as bfloat16 (another parametrization): long.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.long)])
def test_half_precision_inputs_keep_float32_state(dtype):
    # The float32 scan is test_scan_matches_reference's first pinned example (compiled once for both).
    params = _canonical_case(True, 64)
    x, log_a, b, c, s0, seg = _run(params, np.float32)
    y32, f32 = ssd_scan(x, log_a, b, c, chunk_size=64, initial_state=s0, segment_ids=seg)
    half = [a.astype(dtype) for a in (x, log_a, b, c)]
    y, final = ssd_scan(*half, chunk_size=64, initial_state=s0, segment_ids=seg)
    assert y.dtype == dtype and final.dtype == jnp.float32
    # Inputs rounded to 8 (bf16) / 11 (f16) significant bits: ~1e-2 relative is the expected error.
    assert_close(y, y32, rtol=5e-2, name="y")
    assert_close(final, f32, rtol=5e-2, name="final_state")
    y_step, s_step = ssd_step(s0, *(a[:, 0] for a in half))
    assert y_step.dtype == dtype and s_step.dtype == jnp.float32


def _zeros(shape, dtype=np.float32):
    """Host zeros: inputs to lower, and to validation, without compiling an eager op for them."""
    return np.zeros(shape, dtype)


def _with_nan(a):
    a = a.copy()
    a[0, 0, 0] = np.nan
    return a


def _flops(fn, *args) -> float:
    """XLA's cost analysis of the program ``fn`` lowers to (before XLA's optimisation passes: no compile)."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis["flops"])


def test_step_cost_is_constant_and_small():
    """XLA's cost analysis: a step costs O(B·H·P·N), far below scanning even one chunk."""
    bsz, h, p, n = 1, 8, 16, 32
    args = [_zeros((bsz, h, p, n)), _zeros((bsz, h, p)), _zeros((bsz, h)),
            _zeros((bsz, 1, n)), _zeros((bsz, 1, n))]
    step_flops = _flops(ssd_step, *args)
    assert step_flops <= 8 * bsz * h * p * n, step_flops
    for q in (16, 64, 256):
        seq_args = [_zeros((bsz, q, h, p)), _zeros((bsz, q, h)), _zeros((bsz, q, 1, n)),
                    _zeros((bsz, q, 1, n))]
        chunk_flops = _flops(lambda *a, q=q: ssd_scan(*a, chunk_size=q), *seq_args)
        assert step_flops * 4 < chunk_flops, (q, step_flops, chunk_flops)


def test_scan_cost_is_linear_in_chunks():
    """No dense (chunks × chunks) term: FLOPs for 32 chunks are ~4x those for 8 chunks."""
    def flops_for(seq):
        args = [_zeros((1, seq, 4, 8)), _zeros((1, seq, 4)), _zeros((1, seq, 1, 8)),
                _zeros((1, seq, 1, 8))]
        return _flops(lambda *a: ssd_scan(*a, chunk_size=16), *args)

    ratio = flops_for(32 * 16) / flops_for(8 * 16)
    assert 3.9 <= ratio <= 4.1, ratio


# ----------------------------------------------------------------------------- bad inputs
def _good(seq=8, heads=4, groups=2):
    return (_zeros((2, seq, heads, 3)), _zeros((2, seq, heads)), _zeros((2, seq, groups, 5)),
            _zeros((2, seq, groups, 5)))


def test_bad_inputs_raise_clear_errors():
    x, log_a, b, c = _good()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, H, P\)"):
        ssd_scan(x[0], log_a, b, c, chunk_size=4)
    with pytest.raises(ValueError, match="log_a must have 3 axes"):
        ssd_scan(x, log_a[..., None, None], b, c, chunk_size=4)
    with pytest.raises(ValueError, match="multiple of the number of groups"):
        ssd_scan(*_good(heads=3, groups=2), chunk_size=4)
    with pytest.raises(TypeError, match="x must be a floating array"):
        ssd_scan(x.astype(np.int32), log_a, b, c, chunk_size=4)
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
        ssd_scan(x, _with_nan(log_a), b, c, chunk_size=4)
    with pytest.raises(ValueError, match="recurrent state must have shape"):
        ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=_zeros((2, 4, 3, 4)))
    with pytest.raises(TypeError, match="recurrent state must be float32"):
        ssd_scan(x, log_a, b, c, chunk_size=4, initial_state=_zeros((2, 4, 3, 5), jnp.bfloat16))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        ssd_scan(x, log_a, b, c, chunk_size=4, segment_ids=_zeros((2, 8)))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(batch, seq\)"):
        ssd_scan(x, log_a, b, c, chunk_size=4, segment_ids=_zeros((2, 7), np.int32))
    with pytest.raises(ValueError, match="ssd_step needs a state"):
        ssd_step(None, x[:, 0], log_a[:, 0], b[:, 0], c[:, 0])
    with pytest.raises(ValueError, match=r"x must have shape \(batch, H, P\)"):
        ssd_step(_zeros((2, 4, 3, 5)), x, log_a[:, 0], b[:, 0], c[:, 0])


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


@pytest.mark.parametrize("kind", ["diagonal", "diagonal+rank-one"])
def test_one_chunk_from_a_zero_state_built_in_the_program(kind):
    """One chunk from a zero state made inside the jitted program (an empty cache, as a model's forward or
    loss builds it): jaxlib 0.10.2's YNNPACK fusions read the folded zero wrongly when it feeds a matmul, and
    a per-channel decay's outputs came back wrong in most compilations (ssdkit.core.chunked.carried_readout).
    Three programs (batches of 32, 31, 30 rows), each against the oracle, float32 tolerance 1e-4 of the
    largest output (test_scan's float32 bound is 2e-5; the failure was outputs off by 1e3 to 1e36)."""
    from ssdkit.bench import scan_inputs

    def one_chunk(x, la, b, c, kw):
        zero = jnp.zeros((x.shape[0], *np.shape(x)[2:], b.shape[-1]), jnp.float32)
        return ssd_scan(x, la, b, c, chunk_size=16, initial_state=zero, **kw)[0]

    for batch in (32, 31, 30):
        (x, la, b, c), kw = scan_inputs(kind, heads=4, head_dim=32, state_dim=32, seq=16, batch=batch,
                                        key=jax.random.key(batch))
        want = ssd_reference(x, la, b, c, **kw)[0]
        assert_close(jax.jit(one_chunk)(x, la, b, c, kw), want, rtol=1e-4, name=f"y, batch {batch}")

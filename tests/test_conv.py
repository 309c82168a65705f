"""The short causal depthwise conv: full form, step form, carried windows, ``lengths`` and ``segment_ids``.

Tolerances: the conv is a K-term sum (K <= 5) per output, with no accumulation across time, so
float64 agrees with the numpy oracle to ~1e-15 relative (1e-12 leaves room for summation order), and
float32 to a few ulps (1e-5 relative to the largest entry).

Two forms that compute the same sums (full vs step, split vs one pass, with vs without ``lengths``,
jit vs eager) are different compiled programs: XLA may fuse them differently (e.g. contract a
multiply-add into an FMA in one and not the other), so they agree to a few float32 ulps of the summed
terms' magnitude (``assert_same_up_to_rounding`` with ``scale=term_scale(...)``), not bit for bit.
Windows are copies of inputs: exact in every program.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ssdkit import causal_conv1d, causal_conv1d_step
from tests.helpers import assert_same_up_to_rounding

# Tests marked numerics compare float32 results of compiled programs (against the oracle or another program)
# within a few ulps or a few times their rounding: the README reruns them with XLA_FLAGS=--xla_cpu_max_isa=AVX2.
# The others check float64 against the oracle (1e-12, far above a few ulps of a K-term sum), half-precision
# rounding of the inputs, exact data movement, small integers, dtypes or errors.


def conv_oracle(x, w, bias=None, window=None, segment_ids=None):
    """Plain loops: ``out[b, t, c] = bias[c] + Σ_k w[k, c] · in[b, t-(K-1)+k, c]``, history from ``window``.

    With ``segment_ids``, a term is skipped when its position lies in another document than t: documents
    are numbered by counting id changes, and the window (positions < 0) belongs to document 0.
    Returns (y, new_window) in float64; new_window is the last K-1 inputs of [window, x], those of
    documents before the last one zeroed (the next call continues the last document).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    batch, seq, chan = x.shape
    k = w.shape[0]
    hist = np.zeros((batch, k - 1, chan)) if window is None else np.asarray(window, np.float64)
    full = np.concatenate([hist, x], axis=1)  # in[t'] = full[t' + K-1]
    doc = np.zeros((batch, k - 1 + seq), np.int64)  # document number of full[:, t'+K-1]
    if segment_ids is not None:
        ids = np.asarray(segment_ids)
        for b in range(batch):
            for t in range(1, seq):
                doc[b, t + k - 1] = doc[b, t + k - 2] + (ids[b, t] != ids[b, t - 1])
    out = np.zeros((batch, seq, chan))
    for b in range(batch):
        for t in range(seq):
            for c in range(chan):
                acc = 0.0 if bias is None else float(bias[c])
                for i in range(k):
                    if doc[b, t + i] == doc[b, t + k - 1]:
                        acc += w[i, c] * full[b, t + i, c]
                out[b, t, c] = acc
    new_window = np.where((doc[:, seq:] == doc[:, -1:])[:, :, None], full[:, seq:], 0.0)
    return out, new_window


def term_scale(x, w, bias=None, window=None, segment_ids=None) -> float:
    """max over outputs of ``|bias| + Σ_k |w_k · in_k|``: the magnitude a K-term sum's rounding is relative to
    (an output can be far smaller than its terms when they cancel)."""
    absolute = [None if a is None else np.abs(a) for a in (bias, window)]
    return float(conv_oracle(np.abs(x), np.abs(w), *absolute, segment_ids)[0].max())


def make_segments(rng, batch, seq, *, recur=False):
    """(batch, seq) int32 document ids: a new document starts at each position with probability 0.3.

    Ids count up from a random offset per row, or alternate between two values when ``recur`` (an id
    that reappears after another document still starts a new one: only changes matter).
    """
    starts = rng.random((batch, seq)) < 0.3
    starts[:, 0] = False
    doc = np.cumsum(starts, axis=1)
    base = rng.integers(-5, 5, size=(batch, 1))
    return (base + (doc % 2 if recur else doc)).astype(np.int32)


def documents(segment_ids_row):
    """[(start, stop), ...] of the documents of one row (split where the id changes)."""
    ids = np.asarray(segment_ids_row)
    cuts = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist(), len(ids)]
    return list(itertools.pairwise(cuts))


def make_inputs(rng, batch, seq, chan, k, *, with_bias=True, with_window=True):
    x = rng.standard_normal((batch, seq, chan))
    w = rng.standard_normal((k, chan))
    bias = rng.standard_normal(chan) if with_bias else None
    window = rng.standard_normal((batch, k - 1, chan)) if with_window else None
    return x, w, bias, window


def j(a, dtype=None):
    return None if a is None else jnp.asarray(a, dtype)


def f32(*arrays):
    """numpy float32 copies (the conv takes numpy arrays; slicing them costs no compilation)."""
    return tuple(None if a is None else np.asarray(a, np.float32) for a in arrays)


def run_steps(x, w, bias, window):
    """Feed ``x`` token by token through the (jitted) step form; returns stacked y and the last window."""
    step = jax.jit(causal_conv1d_step)
    ys = []
    for t in range(x.shape[1]):
        y_t, window = step(x[:, t], w, bias, window)
        ys.append(np.asarray(y_t))
    return np.stack(ys, axis=1), window


dims = dict(batch=st.integers(1, 3), seq=st.integers(1, 20), chan=st.integers(1, 6), k=st.integers(1, 5),
            seed=st.integers(0, 2**32 - 1))


# ------------------------------------------------------------------------------ against the oracle
def _full_form_matches_oracle_float64(batch, seq, chan, k, seed, with_bias, with_window, segments):
    rng = np.random.default_rng(seed)
    x, w, bias, window = make_inputs(rng, batch, seq, chan, k, with_bias=with_bias, with_window=with_window)
    seg = None if segments is None else make_segments(rng, batch, seq, recur=segments == "recur")
    ref_y, ref_win = conv_oracle(x, w, bias, window, seg)
    with jax.enable_x64(True):
        y, new_window = causal_conv1d(j(x), j(w), j(bias), window=j(window), segment_ids=j(seg))
        assert y.dtype == jnp.float64 and new_window.dtype == jnp.float64
        assert y.shape == (batch, seq, chan) and new_window.shape == (batch, k - 1, chan)
        # K <= 5 terms of O(1) values: float64 rounding is ~1e-15; 1e-12 leaves room for ordering.
        np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.asarray(new_window), ref_win)  # copies of inputs: exact
        # The step form accumulates float64 inputs in float64 too. Decoding packed documents: zero the
        # window of the rows where a new document starts.
        win = j(window) if with_window else np.zeros((batch, k - 1, chan), np.float64)
        steps = []
        for t in range(seq):
            if seg is not None and t > 0:
                win = np.where((seg[:, t] != seg[:, t - 1])[:, None, None], 0.0, win)
            y_t, win = causal_conv1d_step(j(x[:, t]), j(w), j(bias), win)
            steps.append(np.asarray(y_t))
        assert y_t.dtype == jnp.float64
        np.testing.assert_allclose(np.stack(steps, axis=1), ref_y, rtol=1e-12, atol=1e-12)
        # the step form's window after the last document's start equals the full form's: exact
        np.testing.assert_array_equal(np.asarray(win), ref_win)


@given(**dims, with_bias=st.booleans(), with_window=st.booleans(), segments=st.sampled_from([None, "new", "recur"]))
@settings(max_examples=3)
@example(batch=2, seq=1, chan=3, k=5, seed=1, with_bias=True, with_window=True, segments=None)  # seq < K-1
@example(batch=1, seq=3, chan=2, k=1, seed=2, with_bias=False, with_window=False, segments=None)  # K = 1
@example(batch=2, seq=12, chan=2, k=4, seed=5, with_bias=True, with_window=True, segments="recur")
@example(batch=1, seq=5, chan=2, k=1, seed=6, with_bias=True, with_window=False, segments="new")  # K = 1
def test_full_form_matches_oracle_float64(batch, seq, chan, k, seed, with_bias, with_window, segments):
    _full_form_matches_oracle_float64(batch, seq, chan, k, seed, with_bias, with_window, segments)


@pytest.mark.long  # the full example budget
@given(**dims, with_bias=st.booleans(), with_window=st.booleans(), segments=st.sampled_from([None, "new", "recur"]))
@settings(max_examples=20)
@example(batch=2, seq=1, chan=3, k=5, seed=1, with_bias=True, with_window=True, segments=None)  # seq < K-1
@example(batch=1, seq=3, chan=2, k=1, seed=2, with_bias=False, with_window=False, segments=None)  # K = 1
@example(batch=2, seq=12, chan=2, k=4, seed=5, with_bias=True, with_window=True, segments="recur")
@example(batch=1, seq=5, chan=2, k=1, seed=6, with_bias=True, with_window=False, segments="new")  # K = 1
def test_full_form_matches_oracle_float64_long(batch, seq, chan, k, seed, with_bias, with_window, segments):
    _full_form_matches_oracle_float64(batch, seq, chan, k, seed, with_bias, with_window, segments)


def _full_form_matches_oracle_float32(batch, seq, chan, k, seed):
    x, w, bias, window = make_inputs(np.random.default_rng(seed), batch, seq, chan, k)
    ref_y, ref_win = conv_oracle(x, w, bias, window)
    y, new_window = causal_conv1d(j(x, jnp.float32), j(w, jnp.float32), j(bias, jnp.float32),
                                  window=j(window, jnp.float32))
    assert y.dtype == jnp.float32 and new_window.dtype == jnp.float32
    # A few float32 roundings of O(1) terms (plus the float32 cast of the inputs): ~1e-6 absolute.
    np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_window), ref_win, rtol=1e-7)  # float32 cast of inputs only


@pytest.mark.numerics
@given(**dims)
@settings(max_examples=3)
def test_full_form_matches_oracle_float32(batch, seq, chan, k, seed):
    _full_form_matches_oracle_float32(batch, seq, chan, k, seed)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims)
@settings(max_examples=20)
def test_full_form_matches_oracle_float32_long(batch, seq, chan, k, seed):
    _full_form_matches_oracle_float32(batch, seq, chan, k, seed)


@pytest.mark.numerics
def test_kernel_size_one_is_pointwise(rng):
    x, w, bias, _ = make_inputs(rng, 2, 5, 3, 1)
    y, new_window = causal_conv1d(j(x, jnp.float32), j(w, jnp.float32), j(bias, jnp.float32))
    assert new_window.shape == (2, 0, 3)
    # One product and one add per entry in float32.
    np.testing.assert_allclose(np.asarray(y), x * w[0] + bias, rtol=1e-6, atol=1e-6)
    y_t, win = causal_conv1d_step(j(x[:, 0], jnp.float32), j(w, jnp.float32), j(bias, jnp.float32),
                                  jnp.zeros((2, 0, 3)))
    assert win.shape == (2, 0, 3)
    assert_same_up_to_rounding(y_t, y[:, 0], scale=term_scale(x[:, :1], w, bias), name="step vs full")


def test_weight_is_time_major():
    # weight[K-1] multiplies the current input, weight[0] the oldest: an impulse shows the taps in reverse.
    x = np.zeros((1, 6, 1), np.float32)
    x[0, 0, 0] = 1.0
    w = np.asarray([[1.0], [2.0], [3.0], [4.0]], np.float32)
    y, _ = causal_conv1d(x, w)
    np.testing.assert_array_equal(np.asarray(y)[0, :, 0], [4.0, 3.0, 2.0, 1.0, 0.0, 0.0])  # sums of 0·w, 1·w: exact


# ------------------------------------------------------------------------------ step form and carries
def _full_form_equals_stepping(batch, seq, chan, k, seed, with_bias):
    x, w, bias, window = make_inputs(np.random.default_rng(seed), batch, seq, chan, k, with_bias=with_bias)
    x, w, bias, window = f32(x, w, bias, window)
    y, new_window = causal_conv1d(x, w, bias, window=window)
    y_steps, win_steps = run_steps(x, w, bias, window)
    # Same K terms summed in the same order; only fusion differences (e.g. FMA) remain.
    assert_same_up_to_rounding(y_steps, y, scale=term_scale(x, w, bias, window), name="stepped y")
    np.testing.assert_array_equal(np.asarray(win_steps), np.asarray(new_window))  # copies: exact


@pytest.mark.numerics
@given(**dims, with_bias=st.booleans())
@settings(max_examples=3)
@example(batch=2, seq=2, chan=3, k=5, seed=3, with_bias=True)  # seq < K-1
@example(batch=1, seq=4, chan=2, k=1, seed=4, with_bias=True)  # K = 1: empty window
def test_full_form_equals_stepping(batch, seq, chan, k, seed, with_bias):
    _full_form_equals_stepping(batch, seq, chan, k, seed, with_bias)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims, with_bias=st.booleans())
@settings(max_examples=20)
@example(batch=2, seq=2, chan=3, k=5, seed=3, with_bias=True)  # seq < K-1
@example(batch=1, seq=4, chan=2, k=1, seed=4, with_bias=True)  # K = 1: empty window
def test_full_form_equals_stepping_long(batch, seq, chan, k, seed, with_bias):
    _full_form_equals_stepping(batch, seq, chan, k, seed, with_bias)


def _split_sequence_equals_one_pass(batch, seq, chan, k, seed, data):
    cut = data.draw(st.integers(0, seq), label="cut")
    x, w, bias, window = make_inputs(np.random.default_rng(seed), batch, seq, chan, k)
    x, w, bias, window = f32(x, w, bias, window)
    y, new_window = causal_conv1d(x, w, bias, window=window)
    parts, win = [], window
    for piece in (x[:, :cut], x[:, cut:]):
        if piece.shape[1]:
            y_part, win = causal_conv1d(piece, w, bias, window=win)
            parts.append(y_part)
    # Identical sums on identical operands, compiled for different shapes.
    assert_same_up_to_rounding(np.concatenate(parts, axis=1), y, scale=term_scale(x, w, bias, window),
                               name="split y")
    np.testing.assert_array_equal(np.asarray(win), np.asarray(new_window))  # copies: exact


@pytest.mark.numerics
@given(**dims, data=st.data())
@settings(max_examples=3)
def test_split_sequence_equals_one_pass(batch, seq, chan, k, seed, data):
    _split_sequence_equals_one_pass(batch, seq, chan, k, seed, data)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims, data=st.data())
@settings(max_examples=20)
def test_split_sequence_equals_one_pass_long(batch, seq, chan, k, seed, data):
    _split_sequence_equals_one_pass(batch, seq, chan, k, seed, data)


def _lengths_window_equals_running_the_real_prefix(batch, seq, chan, k, seed, data):
    lengths = data.draw(st.lists(st.integers(0, seq), min_size=batch, max_size=batch), label="lengths")
    x, w, bias, window = make_inputs(np.random.default_rng(seed), batch, seq, chan, k)
    x, w, bias, window = f32(x, w, bias, window)
    y, new_window = causal_conv1d(x, w, bias, window=window, lengths=jnp.asarray(lengths, jnp.int32))
    y_full, _ = causal_conv1d(x, w, bias, window=window)
    # lengths only moves the window, but the program with it is another program (issue 8: 5.96e-8 on AVX2).
    assert_same_up_to_rounding(y, y_full, scale=term_scale(x, w, bias, window), name="y with lengths")
    for b, n in enumerate(lengths):
        if n == 0:
            expected = window[b]  # no real token: the window is unchanged
        else:
            _, alone = causal_conv1d(x[b : b + 1, :n], w, bias, window=window[b : b + 1])
            expected = alone[0]
        np.testing.assert_array_equal(np.asarray(new_window[b]), np.asarray(expected))  # copies: exact


@pytest.mark.numerics
@given(**dims, data=st.data())
@settings(max_examples=3)
def test_lengths_window_equals_running_the_real_prefix(batch, seq, chan, k, seed, data):
    _lengths_window_equals_running_the_real_prefix(batch, seq, chan, k, seed, data)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims, data=st.data())
@settings(max_examples=20)
def test_lengths_window_equals_running_the_real_prefix_long(batch, seq, chan, k, seed, data):
    _lengths_window_equals_running_the_real_prefix(batch, seq, chan, k, seed, data)


def test_lengths_short_rows_draw_on_window():
    # K = 4: a row with 1 real token keeps the 2 newest window entries and appends that token.
    x = np.arange(1.0, 7.0, dtype=np.float32).reshape(1, 6, 1)
    window = np.asarray([[[-3.0], [-2.0], [-1.0]]], np.float32)
    w = np.ones((4, 1), np.float32)
    _, new_window = causal_conv1d(x, w, window=window, lengths=np.asarray([1], np.int32))
    np.testing.assert_array_equal(np.asarray(new_window)[0, :, 0], [-2.0, -1.0, 1.0])
    _, new_window = causal_conv1d(x, w, window=window, lengths=np.asarray([0], np.int32))
    np.testing.assert_array_equal(np.asarray(new_window), np.asarray(window))
    _, new_window = causal_conv1d(x, w, window=window, lengths=np.asarray([5], np.int32))
    np.testing.assert_array_equal(np.asarray(new_window)[0, :, 0], [3.0, 4.0, 5.0])


@pytest.mark.numerics
def test_jit_with_traced_lengths_and_segment_ids(rng):
    x, w, bias, window = make_inputs(rng, 3, 9, 4, 4)
    x, w, bias, window = f32(x, w, bias, window)
    lengths = np.asarray([9, 0, 2], np.int32)
    seg = make_segments(rng, 3, 9)
    eager = causal_conv1d(x, w, bias, window=window, lengths=lengths, segment_ids=seg)
    jitted = jax.jit(lambda *a: causal_conv1d(*a[:3], window=a[3], lengths=a[4], segment_ids=a[5]))(
        x, w, bias, window, lengths, seg)
    # The caller's jit inlines the conv into another program than the eager call's.
    assert_same_up_to_rounding(jitted[0], eager[0], scale=term_scale(x, w, bias, window, seg), name="jitted y")
    np.testing.assert_array_equal(np.asarray(jitted[1]), np.asarray(eager[1]))  # copies: exact


# ------------------------------------------------------------------------------ packed documents
def _packed_row_equals_documents_run_alone(batch, seq, chan, k, seed, recur):
    rng = np.random.default_rng(seed)
    x, w, bias, window = f32(*make_inputs(rng, batch, seq, chan, k))
    seg = make_segments(rng, batch, seq, recur=recur)
    lengths = rng.integers(0, seq + 1, size=batch).astype(np.int32)
    y, new_window = causal_conv1d(x, w, bias, window=window, lengths=lengths, segment_ids=seg)
    # Every document alone, all in one batch (one compiled program): a document's row holds it at the
    # start, zeros after it (causal, so they do not touch its outputs); the row's first document
    # continues from the row's window, every later one starts from a zero window.
    docs = [(b, lo, hi) for b in range(batch) for lo, hi in documents(seg[b])]
    alone_x = np.zeros((len(docs), seq, chan), np.float32)
    alone_window = np.zeros((len(docs), k - 1, chan), np.float32)
    for n, (b, lo, hi) in enumerate(docs):
        alone_x[n, : hi - lo] = x[b, lo:hi]
        if lo == 0:
            alone_window[n] = window[b]
    alone_y, _ = causal_conv1d(alone_x, w, bias, window=alone_window)
    expected = np.zeros_like(y)
    for n, (b, lo, hi) in enumerate(docs):
        expected[b, lo:hi] = alone_y[n, : hi - lo]
    # Same taps summed in the same order by two programs; every position (padded ones included: lengths
    # only moves the window).
    assert_same_up_to_rounding(y, expected, scale=term_scale(x, w, bias, window, seg), name="packed y")
    # The window is the inputs [window, x][b, lengths[b] : lengths[b] + K-1] of the last real token's
    # document (the window's positions count as the first document), zeros before that document's start.
    padded = np.concatenate([window, x], axis=1)
    doc = np.concatenate([np.zeros((batch, k - 1), int), np.cumsum(np.concatenate(
        [np.zeros((batch, 1), int), seg[:, 1:] != seg[:, :-1]], axis=1), axis=1)], axis=1)
    for b, n in enumerate(lengths):
        keep = doc[b, n : n + k - 1] == doc[b, n + k - 2]
        np.testing.assert_array_equal(np.asarray(new_window[b]), np.where(keep[:, None], padded[b, n : n + k - 1], 0))


@pytest.mark.numerics
@given(**dims, recur=st.booleans())
@settings(max_examples=2)
@example(batch=3, seq=3, chan=2, k=5, seed=7, recur=True)  # documents shorter than K-1
@example(batch=2, seq=6, chan=2, k=1, seed=8, recur=False)  # K = 1: nothing to mask
def test_packed_row_equals_documents_run_alone(batch, seq, chan, k, seed, recur):
    _packed_row_equals_documents_run_alone(batch, seq, chan, k, seed, recur)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims, recur=st.booleans())
@settings(max_examples=5)
@example(batch=3, seq=3, chan=2, k=5, seed=7, recur=True)  # documents shorter than K-1
@example(batch=2, seq=6, chan=2, k=1, seed=8, recur=False)  # K = 1: nothing to mask
def test_packed_row_equals_documents_run_alone_long(batch, seq, chan, k, seed, recur):
    _packed_row_equals_documents_run_alone(batch, seq, chan, k, seed, recur)


def _one_document_equals_no_segment_ids(batch, seq, chan, k, seed, segment_id):
    x, w, bias, window = f32(*make_inputs(np.random.default_rng(seed), batch, seq, chan, k))
    seg = np.full((batch, seq), segment_id, np.int32)
    y, new_window = causal_conv1d(x, w, bias, window=window, segment_ids=seg)
    y_plain, plain_window = causal_conv1d(x, w, bias, window=window)
    # Nothing masked, but the program with the selects is another program.
    assert_same_up_to_rounding(y, y_plain, scale=term_scale(x, w, bias, window), name="one-document y")
    np.testing.assert_array_equal(np.asarray(new_window), np.asarray(plain_window))  # copies: exact


@pytest.mark.numerics
@given(**dims, segment_id=st.integers(-2**31, 2**31 - 1))
@settings(max_examples=1)
@example(batch=2, seq=2, chan=3, k=5, seed=3, segment_id=0)  # seq < K-1
def test_one_document_equals_no_segment_ids(batch, seq, chan, k, seed, segment_id):
    _one_document_equals_no_segment_ids(batch, seq, chan, k, seed, segment_id)


@pytest.mark.numerics
@pytest.mark.long  # the full example budget
@given(**dims, segment_id=st.integers(-2**31, 2**31 - 1))
@settings(max_examples=3)
@example(batch=2, seq=2, chan=3, k=5, seed=3, segment_id=0)  # seq < K-1
def test_one_document_equals_no_segment_ids_long(batch, seq, chan, k, seed, segment_id):
    _one_document_equals_no_segment_ids(batch, seq, chan, k, seed, segment_id)


def test_nothing_crosses_a_document_start(rng):
    # K = 4; row 0: documents [0, 4) and [4, 9); row 1: [0, 2), [2, 4), [4, 9): id 3 recurs within K-1
    # positions, yet position 4 starts a new document (as in ssd_scan, only changes of id matter).
    seg = np.asarray([[0, 0, 0, 0, 1, 1, 1, 1, 1], [3, 3, 4, 4, 3, 3, 3, 3, 3]], np.int32)
    first = np.asarray([[1, 1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0]], bool)
    x, w, bias, window = f32(*make_inputs(rng, 2, 9, 3, 4))
    cotangent = rng.standard_normal(x.shape).astype(np.float32)

    def later_docs(x, window):
        y, _ = causal_conv1d(x, w, bias, window=window, segment_ids=seg)
        return jnp.sum(jnp.where(first[:, :, None], 0.0, y * cotangent))

    grad_x, grad_window = jax.jit(jax.grad(later_docs, argnums=(0, 1)))(x, window)
    # Masked taps are selects: they contribute exact zeros to the gradient, not tiny values.
    np.testing.assert_array_equal(np.asarray(grad_x)[first], 0.0)
    np.testing.assert_array_equal(np.asarray(grad_window), 0.0)
    assert np.all(np.asarray(grad_x)[~first] != 0.0)
    # Forward: non-finite inputs in the first documents do not reach the later ones.
    poisoned = np.where(first[:, :, None], np.nan, x).astype(np.float32)
    y, _ = causal_conv1d(x, w, bias, window=window, segment_ids=seg)
    y_poisoned, _ = causal_conv1d(poisoned, w, bias, window=np.full_like(window, np.inf), segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(y_poisoned)[~first], np.asarray(y)[~first])  # one program: exact


# ------------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_keep_their_dtype(rng, dtype):
    x, w, bias, window = make_inputs(rng, 2, 7, 5, 4)
    y, new_window = causal_conv1d(j(x, dtype), j(w, jnp.float32), j(bias, jnp.float32), window=j(window, dtype))
    assert y.dtype == dtype and new_window.dtype == dtype
    y_t, win_t = causal_conv1d_step(j(x[:, 0], dtype), j(w, jnp.float32), j(bias, jnp.float32), j(window, dtype))
    assert y_t.dtype == dtype and win_t.dtype == dtype
    ref_y, _ = conv_oracle(np.asarray(j(x, dtype), np.float64), w, bias, np.asarray(j(window, dtype), np.float64))
    # Inputs rounded to half precision above; the float32 sum is then rounded once more to 8 (bf16) or
    # 11 (fp16) mantissa bits: ~4e-3 relative to entries up to ~|y|max.
    scale = np.abs(ref_y).max()
    np.testing.assert_allclose(np.asarray(y, np.float64), ref_y, rtol=0, atol=1e-2 * scale)


def test_window_in_another_dtype_is_cast_to_x_dtype(rng):
    x, w, _, window = make_inputs(rng, 1, 3, 2, 3)
    y, new_window = causal_conv1d(j(x, jnp.bfloat16), j(w, jnp.float32), window=j(window, jnp.float32))
    assert y.dtype == jnp.bfloat16 and new_window.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------ errors
X = jnp.ones((2, 5, 3))
W = jnp.ones((4, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(x=jnp.ones((5, 3))), ValueError, r"x must have shape \(batch, seq, chan\) \(3 axes\).*got \(5, 3\)"),
        (dict(weight=jnp.ones(3)), ValueError, r"weight must have shape \(K, chan\) = \(K, 3\).*got \(3,\)"),
        (dict(weight=jnp.ones((4, 2))), ValueError, r"weight must have shape \(K, chan\) = \(K, 3\) to match"),
        (dict(weight=jnp.ones((0, 3))), ValueError, r"K >= 1 taps, got \(0, 3\)"),
        (dict(bias=jnp.ones(4)), ValueError, r"bias must have shape \(chan,\) = \(3,\), got \(4,\)"),
        (dict(window=jnp.ones((2, 4, 3))), ValueError,
         r"window must have shape \(batch, K-1, chan\) = \(2, 3, 3\).*got \(2, 4, 3\)"),
        (dict(window=jnp.ones((1, 3, 3))), ValueError, r"window must have shape .* = \(2, 3, 3\)"),
        (dict(x=jnp.ones((2, 5, 3), jnp.int32)), TypeError, "x must be a floating array"),
        (dict(weight=jnp.ones((4, 3), jnp.int32)), TypeError, "weight must be a floating array"),
        (dict(bias=jnp.ones(3, jnp.int32)), TypeError, "bias must be a floating array"),
        (dict(window=jnp.ones((2, 3, 3), jnp.int32)), TypeError, "window must be a floating array"),
        (dict(lengths=jnp.ones(2)), TypeError, "lengths must be an integer array"),
        (dict(lengths=jnp.ones(3, jnp.int32)), ValueError, r"lengths must have shape \(batch,\) = \(2,\)"),
        (dict(lengths=jnp.asarray([6, 1])), ValueError, r"lengths must lie in 0\.\.5.*\[6, 1\]"),
        (dict(lengths=jnp.asarray([-1, 1])), ValueError, r"lengths must lie in 0\.\.5"),
        (dict(segment_ids=jnp.zeros((2, 5))), TypeError, "segment_ids must be an integer array"),
        (dict(segment_ids=jnp.zeros((2, 5), bool)), TypeError, "segment_ids must be an integer array"),
        (dict(segment_ids=jnp.zeros((2, 4), jnp.int32)), ValueError,
         r"segment_ids must have shape \(batch, seq\) = \(2, 5\).*got \(2, 4\)"),
        (dict(segment_ids=jnp.zeros(2, jnp.int32)), ValueError,
         r"segment_ids must have shape \(batch, seq\) = \(2, 5\).*got \(2,\)"),
    ],
)
def test_full_form_rejects_bad_inputs(kwargs, error, match):
    args = dict(x=X, weight=W, bias=None, window=None, lengths=None, segment_ids=None) | kwargs
    with pytest.raises(error, match=match):
        causal_conv1d(args["x"], args["weight"], args["bias"], window=args["window"], lengths=args["lengths"],
                      segment_ids=args["segment_ids"])


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((jnp.ones((2, 1, 3)), W, None, jnp.zeros((2, 3, 3))), ValueError,
         r"x must have shape \(batch, chan\) \(2 axes\) in step form"),
        ((jnp.ones((2, 3)), W, None, None), ValueError, "needs the carried window"),
        ((jnp.ones((2, 3)), W, None, jnp.zeros((2, 4, 3))), ValueError,
         r"window must have shape \(batch, K-1, chan\) = \(2, 3, 3\)"),
        ((jnp.ones((2, 3)), jnp.ones((4, 2)), None, jnp.zeros((2, 3, 3))), ValueError,
         r"weight must have shape \(K, chan\) = \(K, 3\)"),
        ((jnp.ones((2, 3), jnp.int32), W, None, jnp.zeros((2, 3, 3))), TypeError, "x must be a floating array"),
    ],
)
def test_step_form_rejects_bad_inputs(args, error, match):
    with pytest.raises(error, match=match):
        causal_conv1d_step(*args)

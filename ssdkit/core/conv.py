"""The short causal depthwise convolution (Mamba-2's conv1d), full-sequence and single-step forms.

Weights are time-major, (K, chan), one K-tap filter per channel (depthwise)::

    out[t, c] = bias[c] + Σ_{k=0..K-1} weight[k, c] · in[t - (K-1) + k, c]

so ``weight[K-1]`` multiplies the current input and ``weight[0]`` the oldest one. The K-1 inputs before
t = 0 come from a carried *window* (batch, K-1, chan), oldest first (zeros when none is given). The
full form computes the sum as K shifted slices of ``concat([window, x], axis=1)`` (one elementwise
fusion, no ``lax.conv``) and returns the window after the sequence; the step form appends one token
and drops the oldest. Both sum the K terms in the same order (k = 0, 1, ..., K-1, then the bias), so
stepping token by token reproduces the full form up to the compiler's fusion choices (in practice
bit for bit on CPU).

With ``lengths`` (right padding), the returned window ends at each row's last *real* token::

    padded = concat([window, x], axis=1)                     (batch, K-1+seq, chan)
    new_window[b] = padded[b, lengths[b] : lengths[b] + K-1]

which draws on the incoming window when a row has fewer than K-1 real tokens (``lengths[b] = 0``
leaves it unchanged). Outputs at padded positions are computed but meaningless.

With ``segment_ids`` (several documents packed in one row), no tap reads across a document start. As in
``ssd_scan``, a document starts wherever the id changes between consecutive positions, and the carried
window belongs to the row's first document. With ``doc[b, s]`` the number of changes in ``1..s``
(``doc = 0`` for the window positions s < 0)::

    out[t, c] = bias[c] + Σ_{k=0..K-1} [doc[t - (K-1) + k] = doc[t]] · weight[k, c] · in[t - (K-1) + k, c]

i.e. the tap reading position s <= t is dropped iff the id changes somewhere in (s, t]. For ids that
never recur after their document ends this is ``segment_ids[s] == segment_ids[t]`` (window taps:
``segment_ids[:, 0] == segment_ids[t]``). A masked tap contributes an exact zero (``where``, not a
product), so no value or gradient crosses a boundary. The returned window holds the row's last
document only (its inputs; zeros before its start), so a following call or decode step continues that
document exactly (zero the window to start a new one).

K = 1 is supported: the window then has zero length. Accumulation is float32 (float64 for float64
inputs); ``y`` and the window come back in ``x.dtype``.

This module checks inputs and dispatches. The kernels are in ``ssdkit.core.conv_kernels``
(:func:`~ssdkit.core.conv_kernels.conv_sequence`, :func:`~ssdkit.core.conv_kernels.conv_step`,
:func:`~ssdkit.core.conv_kernels.window_at`); traced under a mesh whose ``seq`` axis has more than one
device, :func:`causal_conv1d` runs :func:`ssdkit.core.mesh.sharded_causal_conv1d` instead.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ssdkit._typing import ConvBias, ConvSeq, ConvStep, ConvWeight, ConvWindow, Lengths, SegmentIds
from ssdkit.core.conv_kernels import conv_sequence, conv_step
from ssdkit.core.mesh import conv_active, sharded_causal_conv1d
from ssdkit.dtypes import check_floating, check_integer, check_lengths


def _check(x, weight, bias, window, *, seq_form: bool) -> int:
    """Validate conv inputs (full or step form); return the kernel size K."""
    check_floating("x", x)
    check_floating("weight", weight)
    want = 3 if seq_form else 2
    axes = "(batch, seq, chan)" if seq_form else "(batch, chan)"
    form = "sequence" if seq_form else "step"
    if np.ndim(x) != want:
        raise ValueError(f"x must have shape {axes} ({want} axes) in {form} form, got {np.shape(x)}")
    batch, chan = np.shape(x)[0], np.shape(x)[-1]
    if np.ndim(weight) != 2:
        raise ValueError(
            f"weight must have shape (K, chan) = (K, {chan}) (time-major, one K-tap filter per channel), "
            f"got {np.shape(weight)}"
        )
    k, w_chan = np.shape(weight)
    if w_chan != chan:
        raise ValueError(
            f"weight must have shape (K, chan) = (K, {chan}) to match x's {chan} channels, got "
            f"{np.shape(weight)}"
        )
    if k < 1:
        raise ValueError(f"weight must have shape (K, chan) with K >= 1 taps, got {np.shape(weight)}")
    if bias is not None:
        check_floating("bias", bias)
        if np.shape(bias) != (chan,):
            raise ValueError(f"bias must have shape (chan,) = ({chan},), got {np.shape(bias)}")
    if window is not None:
        check_floating("window", window)
        expected = (batch, k - 1, chan)
        if np.shape(window) != expected:
            raise ValueError(
                f"window must have shape (batch, K-1, chan) = {expected} (the K-1 inputs before x, oldest "
                f"first, for a kernel of K={k} taps), got {np.shape(window)}"
            )
    return k


def _check_conv_segment_ids(segment_ids, batch: int, seq: int) -> None:
    check_integer("segment_ids", segment_ids)
    if np.shape(segment_ids) != (batch, seq):
        raise ValueError(
            f"segment_ids must have shape (batch, seq) = ({batch}, {seq}) (one document id per position of "
            f"x), got {np.shape(segment_ids)}"
        )


def causal_conv1d(
    x: ConvSeq,
    weight: ConvWeight,
    bias: ConvBias | None = None,
    *,
    window: ConvWindow | None = None,
    lengths: Lengths | None = None,
    segment_ids: SegmentIds | None = None,
) -> tuple[ConvSeq, ConvWindow]:
    """Causal depthwise convolution over a sequence.

    Args:
        x: (batch, seq, chan) inputs, any float dtype.
        weight: (K, chan) time-major kernel, K >= 1: ``weight[K-1]`` multiplies the current input.
        bias: optional (chan,).
        window: optional (batch, K-1, chan) inputs preceding ``x``, oldest first; zeros if None.
        lengths: optional (batch,) integers in 0..seq, the number of real tokens of each row (right
            padding after them). Only the returned window depends on it. Checked when concrete;
            under ``jit`` values outside 0..seq are a precondition violation (they get clamped).
        segment_ids: optional (batch, seq) integers, one document id per position for packed rows: a new
            document starts where the id changes, and no tap reads across that start (see the module
            docstring). The window taps count only for the row's first document. Ids at padded
            positions (after ``lengths``) do not matter. The returned window keeps only the last
            (real) token's document: earlier documents' inputs in it become zeros.

    Returns:
        ``(y, new_window)``: y (batch, seq, chan) in ``x.dtype`` (accumulated in float32, float64 for
        float64 inputs); new_window (batch, K-1, chan) in ``x.dtype``, the K-1 most recent real inputs,
        drawing on ``window`` for rows with fewer than K-1 real tokens.

    Cost: K multiply-adds per output element, one fused elementwise pass (with ``segment_ids``, one
    select per tap too, on a (batch, seq) mask broadcast over channels).

    Traced under a mesh whose ``seq`` axis has more than one device (``jax.set_mesh``), the sequence is
    split over it, each piece reading the K-1 inputs before it from its neighbour
    (:func:`ssdkit.core.mesh.sharded_causal_conv1d`).
    """
    k = _check(x, weight, bias, window, seq_form=True)
    batch, seq, chan = np.shape(x)
    if lengths is not None:
        check_lengths("lengths", lengths, batch, seq, low=0, meaning="the number of real tokens of each row of x")
    if segment_ids is not None:
        _check_conv_segment_ids(segment_ids, batch, seq)
    if window is None:
        window = jnp.zeros((batch, k - 1, chan), x.dtype)
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    if conv_active():  # traced under a mesh with a 'seq' axis: pieces with a (K-1)-input halo
        return sharded_causal_conv1d(x, weight, bias, window, lengths, segment_ids)
    return conv_sequence(x, weight, bias, window, lengths, segment_ids)


def causal_conv1d_step(
    x: ConvStep, weight: ConvWeight, bias: ConvBias | None, window: ConvWindow
) -> tuple[ConvStep, ConvWindow]:
    """One token: ``y = bias + Σ_k weight[k] · [window, x][k]``; the window drops its oldest input.

    Args:
        x: (batch, chan) the new token's inputs, any float dtype.
        weight: (K, chan); bias: (chan,) or None.
        window: (batch, K-1, chan) the previous K-1 inputs, oldest first (required; zeros to start).

    Returns:
        ``(y, new_window)``: y (batch, chan) in ``x.dtype``; new_window (batch, K-1, chan) in ``x.dtype``,
        ``concat([window[:, 1:], x[:, None]], axis=1)``. Cost O(K·chan) per row.
    """
    if window is None:
        raise ValueError(
            "causal_conv1d_step needs the carried window (batch, K-1, chan); start from zeros, e.g. "
            "jnp.zeros((batch, K - 1, chan), x.dtype)"
        )
    _check(x, weight, bias, window, seq_form=False)
    return conv_step(x, weight, bias, window)

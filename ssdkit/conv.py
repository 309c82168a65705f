"""The short causal depthwise convolution (Mamba-2's conv1d), full-sequence and single-step forms.

Weights are time-major, (K, chan)::

    out[t, c] = bias[c] + Σ_{k=0..K-1} weight[k, c] · in[t - (K-1) + k, c]

with the K-1 inputs before t = 0 taken from a carried window (zeros when none is given). The window
(batch, K-1, chan) holds the most recent K-1 inputs, oldest first, in the input dtype; the full form
returns the window after the sequence (after each row's last real token when ``lengths`` is given) and
the step form shifts it by one token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit._typing import ConvBias, ConvSeq, ConvStep, ConvWeight, ConvWindow, Lengths
from ssdkit.dtypes import accumulation_dtype, check_floating, check_integer


def _check(x, weight, bias, window, *, seq_form: bool) -> int:
    check_floating("x", x)
    check_floating("weight", weight)
    want = 3 if seq_form else 2
    axes = "(batch, seq, chan)" if seq_form else "(batch, chan)"
    if np.ndim(x) != want:
        raise ValueError(f"x must have shape {axes}, got {np.shape(x)}")
    chan = np.shape(x)[-1]
    if np.ndim(weight) != 2 or np.shape(weight)[1] != chan or np.shape(weight)[0] < 1:
        raise ValueError(f"weight must have shape (K, chan) = (K, {chan}) with K >= 1, got {np.shape(weight)}")
    k = np.shape(weight)[0]
    if bias is not None:
        check_floating("bias", bias)
        if np.shape(bias) != (chan,):
            raise ValueError(f"bias must have shape (chan,) = ({chan},), got {np.shape(bias)}")
    if window is not None:
        check_floating("window", window)
        expected = (np.shape(x)[0], k - 1, chan)
        if np.shape(window) != expected:
            raise ValueError(
                f"window must have shape (batch, K-1, chan) = {expected}, got {np.shape(window)}"
            )
    return k


def causal_conv1d(
    x: ConvSeq,
    weight: ConvWeight,
    bias: ConvBias | None = None,
    *,
    window: ConvWindow | None = None,
    lengths: Lengths | None = None,
) -> tuple[ConvSeq, ConvWindow]:
    """Causal depthwise convolution over a sequence.

    Args:
        x: (batch, seq, chan) inputs, any float dtype.
        weight: (K, chan) time-major kernel; bias: optional (chan,).
        window: optional (batch, K-1, chan) inputs preceding ``x`` (oldest first); zeros if None.
        lengths: optional (batch,) number of real tokens per row (right padding after them).

    Returns:
        ``(y, new_window)``: y (batch, seq, chan) in ``x.dtype`` (accumulated in float32); new_window
        (batch, K-1, chan), the K-1 most recent real inputs, drawing on ``window`` for short rows.
    """
    k = _check(x, weight, bias, window, seq_form=True)
    batch, seq, chan = x.shape
    if window is None:
        window = jnp.zeros((batch, k - 1, chan), x.dtype)
    if lengths is not None:
        check_integer("lengths", lengths)
        if np.shape(lengths) != (batch,):
            raise ValueError(f"lengths must have shape (batch,) = ({batch},), got {np.shape(lengths)}")
    acc = accumulation_dtype(x.dtype, weight.dtype)
    padded = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # (batch, K-1+seq, chan)
    w = weight.astype(acc)
    y = sum(padded[:, i : i + seq].astype(acc) * w[i] for i in range(k))
    if bias is not None:
        y = y + bias.astype(acc)
    if lengths is None:
        new_window = padded[:, seq:]
    else:
        # The window ends at each row's last real token: padded[b, len_b : len_b + K-1].
        take = lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, k - 1, axis=0)  # noqa: E731
        new_window = jax.vmap(take)(padded, jnp.asarray(lengths, jnp.int32))
    return y.astype(x.dtype), new_window


def causal_conv1d_step(
    x: ConvStep, weight: ConvWeight, bias: ConvBias | None, window: ConvWindow
) -> tuple[ConvStep, ConvWindow]:
    """One token: ``y = bias + Σ_k weight[k] · [window, x][k]``; the window drops its oldest input.

    Args:
        x: (batch, chan); weight: (K, chan); bias: (chan,) or None; window: (batch, K-1, chan).

    Returns:
        ``(y (batch, chan) in x.dtype, new_window (batch, K-1, chan))``. Cost O(K·chan) per row.
    """
    if window is None:
        raise ValueError("causal_conv1d_step needs the carried window (batch, K-1, chan)")
    _check(x, weight, bias, window, seq_form=False)
    acc = accumulation_dtype(x.dtype, weight.dtype)
    full = jnp.concatenate([window.astype(x.dtype), x[:, None]], axis=1)  # (batch, K, chan)
    y = jnp.einsum("bkc,kc->bc", full.astype(acc), weight.astype(acc))
    if bias is not None:
        y = y + bias.astype(acc)
    return y.astype(x.dtype), full[:, 1:]

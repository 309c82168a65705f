"""The short causal depthwise convolution's single-device kernels: sequence form, step form, window.

Inputs are already checked: :func:`ssdkit.causal_conv1d` and :func:`ssdkit.causal_conv1d_step`
(``ssdkit.core.conv``, which documents the full semantics) check them and call these; the mesh form
:func:`ssdkit.core.mesh.sharded_causal_conv1d` runs :func:`conv_sequence` on each piece with its halo.

Shapes: x (batch, seq, chan) (step form: (batch, chan)); weight (K, chan), time-major; bias (chan,) or
None; window (batch, K-1, chan), the K-1 inputs before x, oldest first; lengths (batch,) and segment_ids
(batch, seq) integers or None. With ``padded = concat([window, x], axis=1)`` (batch, K-1+seq, chan)::

    y[b, t, c]    = bias[c] + Σ_{k=0..K-1} keep[b, t, k] · weight[k, c] · padded[b, t + k, c]
    new_window[b] = padded[b, lengths[b] : lengths[b] + K-1]         (padded[:, seq:] without lengths)

where ``keep[b, t, k]`` is false iff segment_ids changes in (t - (K-1) + k, t] (always true without
segment_ids; a dropped tap is an exact zero, a select), and with segment_ids the window keeps only the
last real token's document (zeros before it). Both forms sum the K terms in the order k = 0..K-1, then
the bias, in float32 (float64 for float64 inputs), so stepping token by token reproduces the sequence
form; y and the window come back in ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssdkit.dtypes import accumulation_dtype


def _same_document_masks(segment_ids, k: int):
    """``keep[j]`` (batch, seq, 1) bool for tap offsets j = 1..K-1 (``keep[0]`` is None: always kept).

    ``keep[j][:, t]`` is true iff the id does not change in (t-j, t]; window positions (< 0) continue
    the first document. Built incrementally: ``keep[j] = keep[j-1] & cont[t-j+1]``, where ``cont[p]``
    says position p continues p-1 (true for p <= 0). K-1 shifted (batch, seq) ANDs; no channel axis.
    """
    batch, seq = segment_ids.shape
    cont = jnp.concatenate(
        [jnp.ones((batch, k), bool), segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1
    )  # cont[:, p + K-1] for p = -(K-1)..seq-1
    keep, cur = [None], None
    for j in range(1, k):
        shifted = cont[:, k - j : k - j + seq]  # cont[t - j + 1]
        cur = shifted if cur is None else cur & shifted
        keep.append(cur[:, :, None])
    return keep


def _weighted_sum(taps, weight, bias, acc):
    """``bias + Σ_k weight[k] · taps[k]`` in ``acc``, summed in the fixed order k = 0..K-1."""
    w = weight.astype(acc)
    y = taps(0) * w[0]
    for i in range(1, weight.shape[0]):
        y = y + taps(i) * w[i]
    if bias is not None:
        y = y + bias.astype(acc)
    return y


def window_at(padded, lengths, size: int):
    """``padded[b, lengths[b] : lengths[b] + size]`` for each row b: the conv window (of ``size`` = K-1
    inputs) after ``lengths[b]`` inputs of ``padded = concat([window, inputs], axis=1)``."""
    return jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, size, axis=0))(padded, lengths)


# One compiled program per shape for eager callers; inside a caller's jit these simply inline.
@jax.jit
def conv_sequence(x, weight, bias, window, lengths, segment_ids):
    """:func:`ssdkit.causal_conv1d` on one device, inputs checked and ``window`` given (zeros to start);
    ``lengths`` (batch,) int32 or None. Returns ``(y, new_window)``."""
    seq, k = x.shape[1], weight.shape[0]
    acc = accumulation_dtype(x.dtype, weight.dtype)
    padded = jnp.concatenate([window.astype(x.dtype), x], axis=1)  # (batch, K-1+seq, chan)

    # Cast each tap after slicing: XLA then shares ``padded`` in x.dtype, not a float32 copy.
    def tap(i):
        return padded[:, i : i + seq].astype(acc)

    if segment_ids is None:
        taps = tap
    else:
        keep = _same_document_masks(segment_ids, k)

        def taps(i):  # tap i reads offset j = K-1-i; a select gives exact zeros (and zero gradients)
            j = k - 1 - i
            return tap(i) if j == 0 else jnp.where(keep[j], tap(i), jnp.zeros((), acc))

    y = _weighted_sum(taps, weight, bias, acc)
    if lengths is None:
        new_window = padded[:, seq:]
    else:  # the window ends at each row's last real token
        new_window = window_at(padded, lengths, k - 1)
    if segment_ids is not None and k > 1:
        # Keep only the last real token's document in the window: a following call continues it exactly.
        batch = segment_ids.shape[0]
        doc = jnp.cumsum(jnp.concatenate([jnp.zeros((batch, 1), jnp.int32),
                                          (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
                                         axis=1), axis=1)
        doc = jnp.concatenate([jnp.zeros((batch, k - 1), jnp.int32), doc], axis=1)  # window positions: doc 0
        if lengths is None:
            window_doc = doc[:, seq:]
        else:
            window_doc = jax.vmap(lambda row, n: jax.lax.dynamic_slice_in_dim(row, n, k - 1))(doc, lengths)
        new_window = jnp.where((window_doc == window_doc[:, -1:])[:, :, None], new_window,
                               jnp.zeros((), new_window.dtype))
    return y.astype(x.dtype), new_window


@jax.jit
def conv_step(x, weight, bias, window):
    """:func:`ssdkit.causal_conv1d_step` on one device, inputs checked. Returns ``(y, new_window)``."""
    acc = accumulation_dtype(x.dtype, weight.dtype)
    full = jnp.concatenate([window.astype(x.dtype), x[:, None]], axis=1)  # (batch, K, chan)
    y = _weighted_sum(lambda i: full[:, i].astype(acc), weight, bias, acc)
    return y.astype(x.dtype), full[:, 1:]

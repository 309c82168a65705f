"""Verify k tokens in one pass, then keep any prefix of them: the rollback that speculative decoding needs.

A recurrent state cannot be rewound like a key/value cache: once a draft token's step is taken the old
state is gone. The SSD structure gives an exact and cheap way around it. Verifying k draft tokens from a
cache is a short prefill from that cache (:func:`ssd_verify`: one chunked scan, one pass of the weights for
k tokens), and the state after the first j of them needs neither a second pass nor per-token snapshots:
it is the scan with the steps past j turned into identity steps (``log_a = 0``, ``x = 0``), which
:func:`ssd_commit` evaluates directly from the k steps' inputs::

    S_j = exp(Σ_{t<j} a_t) · S_0 + Σ_{t<j} exp(Σ_{t<s<j} a_s) · x_t ⊗ b_t

(per head; per state channel for a diagonal decay). The record kept per layer is the entering state and
the k steps' inputs, O(k·(H·P + H + G·N)) numbers, instead of k states, O(k·H·P·N). The conv window is
data movement: after j of the k inputs it is ``concat([window, inputs])[j : j + K - 1]``
(:func:`conv_commit`). Each row of a batch commits its own j.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from ssdkit._typing import ConvWindow, SeqKeys, SeqLogDecay, SeqRankOne, SeqValues, State
from ssdkit.core.conv_kernels import window_at
from ssdkit.core.recurrence import DecayKind, Recurrence
from ssdkit.core.scan import ssd_scan
from ssdkit.dtypes import accumulation_dtype, check_lengths

Accepted = Integer[Array, " batch"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScanRecord:
    """What :func:`ssd_commit` needs of k verified steps: the state before them and their inputs.

    Attributes:
        state: (batch, H, P, N) the state before the k steps.
        x: (batch, k, H, P) values; log_a: (batch, k, H) or (batch, k, H, N); b: (batch, k, G, N) keys.
    """

    state: State
    x: SeqValues
    log_a: SeqLogDecay
    b: SeqKeys


def ssd_verify(
    state: State, x: SeqValues, log_a: SeqLogDecay, b: SeqKeys, c: SeqKeys, *, chunk_size: int | None = None,
    w: SeqRankOne | None = None, u: SeqRankOne | None = None,
) -> tuple[SeqValues, ScanRecord]:
    """k steps from ``state`` in one chunked scan: ``(y (batch, k, H, P), record)``.

    ``y[:, t]`` equals the output of the t-th of k :func:`ssdkit.ssd_step` calls; ``record`` lets
    :func:`ssd_commit` return the state after any prefix of the k steps. ``chunk_size`` defaults to k.
    Shapes as :func:`ssdkit.ssd_scan` (``state`` required). A rank-one transition (``w``, ``u``) is not
    supported yet and is refused.
    """
    if w is not None or u is not None:
        raise ValueError("ssd_verify / ssd_commit with a rank-one transition (w, u; the delta-rule family) are not "
                         "supported yet: verify with ssd_scan(..., w=w, u=u, initial_state=state) and step the "
                         "accepted tokens with ssd_step")
    if state is None:
        raise ValueError("ssd_verify continues from a cache: pass its state (batch, H, P, N)")
    k = np.shape(x)[1] if np.ndim(x) >= 2 else 0
    if k < 1:
        raise ValueError(f"x must hold at least one step to verify: (batch, k >= 1, H, P), got {np.shape(x)}")
    y, _ = ssd_scan(x, log_a, b, c, chunk_size=chunk_size or k, initial_state=state)
    return y, ScanRecord(state=state, x=x, log_a=log_a, b=b)


def ssd_commit(record: ScanRecord, accepted: Accepted) -> State:
    """The state after the first ``accepted[i]`` (0..k) of the recorded steps, row by row.

    Equals ``accepted[i]`` single :func:`ssdkit.ssd_step` calls from ``record.state`` (0 returns the
    state unchanged, k the state :func:`ssdkit.ssd_scan` ends with). Cost O(k·H·P·N) per row, one pass.
    """
    spec = Recurrence.from_inputs(record.x, record.log_a, record.b, chunk_size=max(np.shape(record.x)[1], 1))
    spec.check_scan_inputs(record.x, record.log_a, record.b, record.b, record.state)
    check_accepted(accepted, np.shape(record.x)[0], np.shape(record.x)[1])
    return _commit(spec, record, jnp.asarray(accepted, jnp.int32))


def conv_commit(window: ConvWindow, inputs: Float[Array, "batch k chan"], accepted: Accepted) -> ConvWindow:
    """The conv window after the first ``accepted[i]`` (0..k) of ``inputs`` (batch, k, chan), row by row:
    ``concat([window, inputs], axis=1)[i, accepted[i] : accepted[i] + K - 1]`` (window (batch, K-1, chan))."""
    batch, k = np.shape(inputs)[:2]
    if np.ndim(window) != 3 or np.shape(window)[0] != batch or np.shape(window)[2] != np.shape(inputs)[2]:
        raise ValueError(f"window must have shape (batch, K-1, chan) = ({batch}, K-1, {np.shape(inputs)[2]}), "
                         f"got {np.shape(window)}")
    check_accepted(accepted, batch, k)
    padded = jnp.concatenate([jnp.asarray(window).astype(inputs.dtype), inputs], axis=1)
    return window_at(padded, jnp.asarray(accepted, jnp.int32), np.shape(window)[1])


def check_accepted(accepted, batch: int, k: int) -> None:
    """Raise unless ``accepted`` is a (batch,) integer array with values in 0..k (checked when concrete)."""
    check_lengths("accepted", accepted, batch, k, low=0, meaning="the number of verified steps")


@functools.partial(jax.jit, static_argnums=0)
def _commit(spec: Recurrence, record: ScanRecord, accepted):
    acc = accumulation_dtype(record.state.dtype, record.x.dtype, record.log_a.dtype, record.b.dtype)
    k = record.x.shape[1]
    keep = jnp.arange(k)[None, :] < accepted[:, None]  # (batch, k): the steps taken
    a = record.log_a.astype(acc)
    keep_a = keep.reshape(keep.shape + (1,) * (a.ndim - 2))
    a = jnp.where(keep_a, a, 0)  # steps past the prefix: identity
    incl = jnp.flip(jnp.cumsum(jnp.flip(a, 1), axis=1), 1)
    after = jnp.concatenate([incl[:, 1:], jnp.zeros_like(incl[:, :1])], axis=1)  # Σ_{s>t} a_s, kept steps only
    w = jnp.where(keep_a, jnp.exp(after), 0)  # (batch, k, H) or (batch, k, H, N)
    bh = jnp.repeat(record.b.astype(acc), spec.heads_per_group, axis=2)  # (batch, k, H, N): each head's group
    x = record.x.astype(acc)
    if spec.decay is DecayKind.DIAGONAL:
        added = jnp.einsum("bkhn,bkhp->bhpn", w * bh, x, preferred_element_type=acc)
        carried = jnp.exp(incl[:, 0])[:, :, None, :]
    else:
        added = jnp.einsum("bkh,bkhp,bkhn->bhpn", w, x, bh, preferred_element_type=acc)
        carried = jnp.exp(incl[:, 0])[:, :, None, None]
    return (carried * record.state.astype(acc) + added).astype(record.state.dtype)

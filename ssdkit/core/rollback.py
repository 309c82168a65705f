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

A diagonal-plus-rank-one transition (``w, u``: the delta-rule family, ``S_t = S_{t-1} A_t + x_t ⊗ b_t``,
``A_t = D_t + w_t u_tᵀ``, ``D_t = diag(exp(log_a_t))``) is a diagonal recurrence with a second rank-one
input once ``h_t = S_{t-1} w_t`` (a P-vector per head) is known::

    S_t = S_{t-1} D_t + h_t ⊗ u_t + x_t ⊗ b_t

so the state after the first j steps is the diagonal commit with both inputs, ``Γ_t = D_1⋯D_t``::

    S_j = S_0 Γ_j + Σ_{s<=j} (h_s ⊗ u_s + x_s ⊗ b_s) diag(Γ_j/Γ_s)

:func:`ssd_verify` computes ``h`` for the k steps once, in the UT form of one block of k steps
(``ssdkit.core.chunked._rank_one_scan`` with the entering state folded in)::

    h = T (W̃ S_0ᵀ + L_bw x),    T = (I - L_uw)⁻¹,    W̃_t = Γ_{t-1} ⊙ w_t,
    L_uw[t, s] = (u_s ⊙ Γ_{t-1}/Γ_s)·w_t,    L_bw[t, s] = (b_s ⊙ Γ_{t-1}/Γ_s)·w_t    (s < t)

``T`` is unit lower triangular, so ``h_s`` depends on steps ``<= s`` only: the h of k steps is the h of
every prefix, and a commit is exact for any j without touching the steps past j (nor the weights). The
record adds ``h`` (k·H·P numbers) and ``u`` (k·G·N or k·H·N) to the diagonal record; ``w`` and ``c`` are
not needed after the verify.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Integer

from ssdkit._typing import ConvWindow, SeqKeys, SeqLogDecay, SeqRankOne, SeqValues, State
from ssdkit.core.chunked import bonus_term, decay_matrix, decayed_scores, shift_rows, unit_lower_solve
from ssdkit.core.conv_kernels import window_at
from ssdkit.core.recurrence import DecayKind, RankOne, Recurrence, check_readout
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
        h: with a rank-one transition, (batch, k, H, P) ``h_t = S_{t-1} w_t``, the state before step t
            applied to its ``w_t`` (in the accumulation dtype); None for the diagonal kinds.
        u: with a rank-one transition, (batch, k, G, N) or (batch, k, H, N), the steps' ``u``; else None.
    """

    state: State
    x: SeqValues
    log_a: SeqLogDecay
    b: SeqKeys
    h: SeqValues | None = None
    u: SeqRankOne | None = None


def ssd_verify(
    state: State, x: SeqValues, log_a: SeqLogDecay, b: SeqKeys, c: SeqKeys, *, chunk_size: int | None = None,
    w: SeqRankOne | None = None, u: SeqRankOne | None = None,
    bonus: jax.Array | None = None, readout: str = "inclusive",
) -> tuple[SeqValues, ScanRecord]:
    """k steps from ``state`` in one chunked scan: ``(y (batch, k, H, P), record)``.

    ``y[:, t]`` equals the output of the t-th of k :func:`ssdkit.ssd_step` calls; ``record`` lets
    :func:`ssd_commit` return the state after any prefix of the k steps. ``chunk_size`` defaults to k.
    Shapes as :func:`ssdkit.ssd_scan` (``state`` required).

    With a rank-one transition (``w, u``, shaped like ``b`` or per head, as :func:`ssdkit.ssd_scan`) the
    k steps are one UT block from ``state`` (module docstring): ``h = T (W̃ S_0ᵀ + L_bw x)`` and::

        y_t = S_0 (Γ_t ⊙ c_t) + Σ_{s<=t} [(b_s ⊙ Γ_t/Γ_s)·c_t] x_s + [(u_s ⊙ Γ_t/Γ_s)·c_t] h_s

    with a k×k unit lower-triangular solve per row and head (cost O(k²·(N + P) + k·P·N) per head, plus
    log2 k products of k×k matrices): k is a draft length, so ``chunk_size`` must be None or >= k.
    The record then also holds ``h`` and ``u``.

    ``bonus`` and ``readout`` as :func:`ssdkit.ssd_scan` (``y_t`` then equals the step's with the same
    arguments); they change ``y`` only: the record, and so :func:`ssd_commit`, are the same.
    """
    if state is None:
        raise ValueError("ssd_verify continues from a cache: pass its state (batch, H, P, N)")
    k = np.shape(x)[1] if np.ndim(x) >= 2 else 0
    if k < 1:
        raise ValueError(f"x must hold at least one step to verify: (batch, k >= 1, H, P), got {np.shape(x)}")
    if w is not None or u is not None:
        if chunk_size is not None and chunk_size < k:
            raise ValueError(f"ssd_verify with a rank-one transition (w, u) runs its k = {k} steps as one block: "
                             f"chunk_size must be None or >= k, got {chunk_size}")
        spec = Recurrence.from_inputs(x, log_a, b, chunk_size=k, w=w, u=u)
        spec.check_scan_inputs(x, log_a, b, c, state, w=w, u=u)
        exclusive = check_readout(spec, readout, bonus, np.shape(x)[:2])
        if exclusive or bonus is not None:
            y, h = _verify_rank_one(spec, state, x, log_a, b, c, w, u, bonus, exclusive=exclusive)
        else:
            y, h = _verify_rank_one(spec, state, x, log_a, b, c, w, u)
        return y, ScanRecord(state=state, x=x, log_a=log_a, b=b, h=h, u=u)
    if bonus is not None or readout != "inclusive":
        y, _ = ssd_scan(x, log_a, b, c, chunk_size=chunk_size or k, initial_state=state, bonus=bonus, readout=readout)
    else:
        y, _ = ssd_scan(x, log_a, b, c, chunk_size=chunk_size or k, initial_state=state)
    return y, ScanRecord(state=state, x=x, log_a=log_a, b=b)


def ssd_commit(record: ScanRecord, accepted: Accepted) -> State:
    """The state after the first ``accepted[i]`` (0..k) of the recorded steps, row by row.

    Equals ``accepted[i]`` single :func:`ssdkit.ssd_step` calls from ``record.state`` (0 returns the
    state unchanged, k the state :func:`ssdkit.ssd_scan` ends with). Cost O(k·H·P·N) per row, one pass.
    With a rank-one transition (``record.h``, ``record.u``) it is the same sum with the second input
    ``h_s ⊗ u_s`` (module docstring), masked past each row's j the same way.
    """
    if (record.h is None) != (record.u is None):
        raise ValueError("a ScanRecord holds both h and u (a rank-one transition) or neither")
    spec = Recurrence.from_inputs(record.x, record.log_a, record.b, chunk_size=max(np.shape(record.x)[1], 1),
                                  w=record.u, u=record.u)
    spec.check_scan_inputs(record.x, record.log_a, record.b, record.b, record.state, w=record.u, u=record.u)
    if record.h is not None and np.shape(record.h) != np.shape(record.x):
        raise ValueError(f"record.h must have the shape of record.x {np.shape(record.x)}, got {np.shape(record.h)}")
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
    if spec.has_rank_one:  # the second input h_s ⊗ u_s: the same weights, stacked after the k steps (x | h)
        uh = record.u.astype(acc)
        if spec.rank_one is RankOne.GROUPS:
            uh = jnp.repeat(uh, spec.heads_per_group, axis=2)
        w = jnp.concatenate([w, w], axis=1)
        bh = jnp.concatenate([bh, uh], axis=1)
        x = jnp.concatenate([x, record.h.astype(acc)], axis=1)
    if spec.decay is DecayKind.DIAGONAL:
        added = jnp.einsum("bkhn,bkhp->bhpn", w * bh, x, preferred_element_type=acc)
        carried = jnp.exp(incl[:, 0])[:, :, None, :]
    else:
        added = jnp.einsum("bkh,bkhp,bkhn->bhpn", w, x, bh, preferred_element_type=acc)
        carried = jnp.exp(incl[:, 0])[:, :, None, None]
    return (carried * record.state.astype(acc) + added).astype(record.state.dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("exclusive",))
def _verify_rank_one(spec: Recurrence, state, x, log_a, b, c, w, u, bonus=None, exclusive=False):
    """The k steps from ``state`` as one UT block: ``(y (batch, k, H, P) in x.dtype, h (batch, k, H, P))``.

    ``h = T (W̃ S_0ᵀ + L_bw x)`` and ``y`` as in :func:`ssd_verify`; the decay ratios ``Γ_t/Γ_s`` come from
    ``ssdkit.core.chunked.decay_matrix`` (sums of log-decays, never ratios). Every contraction is batched
    over (batch, head) merged; ``b, c`` (and per-group ``w, u``) are broadcast over the heads of a group.
    """
    batch, k = x.shape[:2]
    h, p, n, r = spec.num_heads, spec.head_dim, spec.state_dim, spec.heads_per_group
    diagonal = spec.decay is DecayKind.DIAGONAL
    acc = accumulation_dtype(state.dtype, x.dtype, log_a.dtype, b.dtype, c.dtype, w.dtype, u.dtype)
    mm = functools.partial(jnp.einsum, preferred_element_type=acc)
    z = batch * h

    def heads(t, per_group=True):  # (batch, k, G or H, width) -> (batch·H, k, width)
        t = t.astype(acc)
        if per_group and r > 1:
            t = jnp.repeat(t, r, axis=2)
        return jnp.moveaxis(t, 2, 1).reshape(z, k, t.shape[-1])

    per_group = spec.rank_one is RankOne.GROUPS
    xh, bh, ch = heads(x, per_group=False), heads(b), heads(c)
    wh, uh = heads(w, per_group), heads(u, per_group)
    s0 = state.astype(acc).reshape(z, p, n)
    if diagonal:
        at = jnp.moveaxis(log_a.astype(acc), 1, -1).reshape(z, n, k)  # (z, n, k)
    else:
        at = jnp.moveaxis(log_a.astype(acc), 1, -1).reshape(z, k)  # (z, k)

    def per_position(f):  # a decay factor (z, k) or (z, n, k) as a multiplier of (z, k, n)
        return jnp.swapaxes(f, -1, -2) if diagonal else f[..., None]

    prefix = jnp.cumsum(at, axis=-1)  # log Γ_t
    before = jnp.concatenate([jnp.zeros_like(prefix[..., :1]), prefix[..., :-1]], axis=-1)  # log Γ_{t-1}
    decay = decay_matrix(at)  # Γ_t/Γ_s, t >= s: (z, l, s) or (z, n, l, s)
    shifted = shift_rows(decay)  # Γ_{t-1}/Γ_s, s < t

    def scores(left, right, dec):
        return decayed_scores(left, right, dec, diagonal, acc)

    l_uw = scores(wh, uh, shifted)  # strictly lower
    l_bw = scores(wh, bh, shifted)
    rhs = mm("kpn,ktn->ktp", s0, wh * per_position(jnp.exp(before))) + mm("kts,ksp->ktp", l_bw, xh)
    hh = unit_lower_solve(l_uw, rhs, acc)  # (z, k, p): h_t = S_{t-1} w_t
    read, read_prefix = (shifted, before) if exclusive else (decay, prefix)  # y_t = S_{t-1} c_t
    y = (mm("kpn,kln->klp", s0, ch * per_position(jnp.exp(read_prefix)))
         + mm("kls,ksp->klp", scores(ch, bh, read), xh) + mm("kls,ksp->klp", scores(ch, uh, read), hh))

    def back(t):  # (batch·H, k, P) -> (batch, k, H, P)
        return jnp.moveaxis(t.reshape(batch, h, k, p), 1, 2)

    if bonus is not None:
        return (back(y) + bonus_term(spec, x, b, c, bonus, acc)).astype(x.dtype), back(hh)
    return back(y).astype(x.dtype), back(hh)

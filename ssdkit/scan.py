"""The chunked SSD scan: the dual (matmul) form inside chunks, a linear scan across chunks.

For one head, the recurrence ``S_t = exp(a_t) * S_{t-1} + x_t ⊗ b_t,  y_t = S_t · c_t`` is split into
chunks of Q steps. With in-chunk cumulative log-decays (all sums of non-positive terms, never
differences, so they are exact up to rounding and never overflow)::

    prefix[l]  = Σ_{j <= l} a_j              decay from the chunk start to l
    suffix[s]  = Σ_{j >  s} a_j              decay from s to the chunk end
    seg[l, s]  = Σ_{s < j <= l} a_j          decay from s to l (l >= s), by a masked cumsum
    total      = prefix[Q - 1]

each chunk c with entering state H_c contributes::

    y[l]     = Σ_{s<=l} (c_l · b_s) exp(seg[l, s]) x_s  +  exp(prefix[l]) (H_c · c_l)   (dual form)
    S_c      = Σ_s exp(suffix[s]) x_s ⊗ b_s                                              (chunk state)
    H_{c+1}  = exp(total) H_c + S_c                                  (``lax.scan`` over chunks)

For a diagonal decay (one log-decay per state channel) the same sums are taken per channel and the
decay factors move inside the contraction over N; the in-chunk decay tensor is then (Q, Q, N) per head.

Sequence resets (``segment_ids``) set the log-decay at a document's first token to a huge negative
finite value, so every decay factor that crosses the boundary is exactly zero (and its gradient too).
Lengths that are not a multiple of Q are padded with identity steps (``a = 0``, ``x = b = c = 0``),
which leave the final state exact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssdkit._typing import SegmentIds, SeqKeys, SeqLogDecay, SeqValues, State
from ssdkit.dtypes import accumulation_dtype
from ssdkit.recurrence import DecayKind, Recurrence

#: log-decay written at a sequence reset; exp() of any sum containing it is exactly 0.
RESET_LOG_DECAY = -1.0e30


def apply_resets(log_a: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Force the decay to zero where ``segment_ids`` changes between consecutive steps.

    ``log_a`` is (batch, seq, H) or (batch, seq, H, N); ``segment_ids`` is (batch, seq). Step 0 never
    resets: an initial state belongs to the first segment of its row.
    """
    reset = jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    reset = reset.reshape(reset.shape + (1,) * (log_a.ndim - 2))
    return jnp.where(reset, jnp.asarray(RESET_LOG_DECAY, log_a.dtype), log_a)


def _segsum(a: jax.Array) -> jax.Array:
    """``out[..., l, s] = Σ_{s < j <= l} a[..., j]`` for l >= s (0 above the diagonal).

    A masked cumulative sum, not ``cumsum[l] - cumsum[s]``: no cancellation, exact at resets.
    """
    q = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((q, q), bool), -1)
    z = jnp.where(strictly_lower, a[..., :, None], 0)
    return jnp.cumsum(z, axis=-2)


def _decay_matrix(a: jax.Array) -> jax.Array:
    """``exp(seg[l, s])`` on and below the diagonal, 0 above: (..., Q) -> (..., Q, Q)."""
    q = a.shape[-1]
    causal = jnp.tril(jnp.ones((q, q), bool))
    return jnp.where(causal, jnp.exp(_segsum(a)), 0)


def _suffix_sums(a: jax.Array) -> jax.Array:
    """``out[..., s] = Σ_{j > s} a[..., j]`` along the last axis, by a reversed cumsum."""
    incl = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)
    return jnp.concatenate([incl[..., 1:], jnp.zeros_like(incl[..., :1])], axis=-1)


def ssd_scan(
    x: SeqValues,
    log_a: SeqLogDecay,
    b: SeqKeys,
    c: SeqKeys,
    *,
    chunk_size: int,
    initial_state: State | None = None,
    segment_ids: SegmentIds | None = None,
) -> tuple[SeqValues, State]:
    """Chunked SSD scan of ``S_t = exp(log_a_t) * S_{t-1} + x_t ⊗ b_t``, ``y_t = S_t · c_t``.

    Args:
        x: (batch, seq, H, P) values, any float dtype; ``y`` comes back in this dtype.
        log_a: (batch, seq, H) scalar or (batch, seq, H, N) diagonal log-decay, ``<= 0``.
        b: (batch, seq, G, N) keys (Mamba-2's B, already multiplied by dt where relevant).
        c: (batch, seq, G, N) queries (Mamba-2's C). Head h reads group ``h // (H // G)``.
        chunk_size: Q, any positive integer; any ``seq`` works (padded internally).
        initial_state: optional (batch, H, P, N) state before step 0 (float32 or float64).
        segment_ids: optional (batch, seq) integers; the state resets where the id changes.

    Returns:
        ``(y, final_state)``: y (batch, seq, H, P) in ``x.dtype``; final_state (batch, H, P, N) in
        the accumulation dtype (float32, or float64 for float64 inputs), or ``initial_state.dtype``.

    Cost: O(seq · Q · (N + P)) per head for the dual form plus O(seq / Q) sequential chunk steps.
    """
    spec = Recurrence.from_inputs(x, log_a, b, chunk_size=chunk_size)
    spec.check_scan_inputs(x, log_a, b, c, initial_state, segment_ids)
    return _chunked_scan(spec, x, log_a, b, c, initial_state, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _chunked_scan(spec: Recurrence, x, log_a, b, c, initial_state, segment_ids):
    batch, seq = x.shape[:2]
    h, p, n, g, r = spec.num_heads, spec.head_dim, spec.state_dim, spec.num_groups, spec.heads_per_group
    q = spec.chunk_size
    diagonal = spec.decay is DecayKind.DIAGONAL
    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, *state_dtypes)

    a = log_a.astype(acc)
    if segment_ids is not None:
        a = apply_resets(a, segment_ids)

    n_chunks = -(-seq // q)
    pad = n_chunks * q - seq
    if pad:
        def pad_seq(t):
            return jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))

        x, a, b, c = pad_seq(x), pad_seq(a), pad_seq(b), pad_seq(c)

    xc = x.reshape(batch, n_chunks, q, g, r, p)
    bc = b.reshape(batch, n_chunks, q, g, n)
    cc = c.reshape(batch, n_chunks, q, g, n)
    if diagonal:
        # (batch, chunk, q, g, r, n) -> (batch, chunk, g, r, n, q): the in-chunk axis last.
        at = jnp.moveaxis(a.reshape(batch, n_chunks, q, g, r, n), 2, -1)
    else:
        at = jnp.moveaxis(a.reshape(batch, n_chunks, q, g, r), 2, -1)  # (batch, chunk, g, r, q)

    prefix = jnp.cumsum(at, axis=-1)
    total = prefix[..., -1]
    suffix = _suffix_sums(at)
    decay = _decay_matrix(at)  # scalar: (b, c, g, r, q, s); diagonal: (b, c, g, r, n, q, s)

    # Intra-chunk (dual form): a masked, decayed attention-like product.
    if diagonal:
        scores = jnp.einsum("bclgn,bcsgn,bcgrnls->bcgrls", cc, bc, decay, preferred_element_type=acc)
    else:
        cb = jnp.einsum("bclgn,bcsgn->bcgls", cc, bc, preferred_element_type=acc)
        scores = cb[:, :, :, None] * decay
    y_diag = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores, xc, preferred_element_type=acc)

    # Chunk states: each chunk's contribution to the state at its end.
    w = jnp.exp(suffix)
    if diagonal:
        chunk_states = jnp.einsum("bcgrns,bcsgrp,bcsgn->bcgrpn", w, xc, bc, preferred_element_type=acc)
    else:
        chunk_states = jnp.einsum("bcgrs,bcsgrp,bcsgn->bcgrpn", w, xc, bc, preferred_element_type=acc)

    # Inter-chunk recurrence: a scan over chunks, linear in their number.
    chunk_decay = jnp.exp(total)  # (b, c, g, r) or (b, c, g, r, n)
    if initial_state is None:
        h0 = jnp.zeros((batch, g, r, p, n), acc)
    else:
        h0 = initial_state.astype(acc).reshape(batch, g, r, p, n)

    def carry_chunk(state, inputs):
        dec, s = inputs
        dec = dec[..., None, :] if diagonal else dec[..., None, None]
        return dec * state + s, state

    final, entering = lax.scan(
        carry_chunk, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(chunk_states, 1, 0))
    )
    entering = jnp.moveaxis(entering, 0, 1)  # (b, c, g, r, p, n): state entering each chunk

    # Contribution of the carried state to each position of the chunk.
    in_decay = jnp.exp(prefix)
    if diagonal:
        y_off = jnp.einsum("bclgn,bcgrnl,bcgrpn->bclgrp", cc, in_decay, entering, preferred_element_type=acc)
    else:
        y_off = jnp.einsum("bclgn,bcgrpn->bclgrp", cc, entering, preferred_element_type=acc)
        y_off = y_off * jnp.moveaxis(in_decay, -1, 2)[..., None]

    y = (y_diag + y_off).reshape(batch, n_chunks * q, h, p)[:, :seq].astype(x.dtype)
    final_dtype = acc if initial_state is None else initial_state.dtype
    return y, final.reshape(batch, h, p, n).astype(final_dtype)

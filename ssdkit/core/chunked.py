"""The single-device chunked SSD scan: the dual (matmul) form inside chunks, a linear scan across chunks.

For one head, the recurrence ``S_t = exp(a_t) * S_{t-1} + x_t ⊗ b_t,  y_t = S_t · c_t`` is split into
chunks of Q steps. With in-chunk cumulative log-decays (all sums of non-positive terms, never
differences, so they are exact up to rounding and never overflow)::

    prefix[l]  = Σ_{j <= l} a_j              decay from the chunk start to l
    suffix[s]  = Σ_{j >  s} a_j              decay from s to the chunk end
    seg[l, s]  = Σ_{s < j <= l} a_j          decay from s to l (l >= s), see decay_matrix
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

Shapes: x (batch, seq, H, P); log_a (batch, seq, H) scalar or (batch, seq, H, N) diagonal, ``<= 0``;
b, c (batch, seq, G, N), head h reading group ``h // (H // G)``; states (batch, H, P, N).

This is the kernel alone, on inputs already checked: :func:`ssdkit.ssd_scan` (``ssdkit.core.scan``) checks
them and calls :func:`chunked_scan`, or, traced under a mesh, :func:`ssdkit.core.mesh.sharded_ssd_scan`,
which runs :func:`chunked_scan` on each device's piece and heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ssdkit.core.recurrence import DecayKind, RankOne, Recurrence
from ssdkit.dtypes import accumulation_dtype

#: log-decay written at a sequence reset; exp() of any sum containing it is exactly 0.
RESET_LOG_DECAY = -1.0e30


def apply_resets(log_a: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """Force the decay to zero where ``segment_ids`` changes between consecutive steps.

    ``log_a`` is (batch, seq, H) or (batch, seq, H, N); ``segment_ids`` is (batch, seq). Step 0 never
    resets: an initial state belongs to the first segment of its row.
    """
    reset = segment_starts(segment_ids)
    reset = reset.reshape(reset.shape + (1,) * (log_a.ndim - 2))
    return jnp.where(reset, jnp.asarray(RESET_LOG_DECAY, log_a.dtype), log_a)


def segment_starts(segment_ids: jax.Array) -> jax.Array:
    """(batch, seq) booleans: True where ``segment_ids`` changes from the previous step (never at step 0)."""
    return jnp.concatenate(
        [jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )


def carried_readout(queries: jax.Array, entering: jax.Array, single_chunk: bool, acc) -> jax.Array:
    """``Σ_n queries[k, l, n] entering[k, p, n]``: (k, l, n), (k, p, n) -> (k, l, p), the entering state read out.

    One chunk's entering state is the initial state, often a known zero (an empty cache built inside the same
    jitted program), which XLA folds to a broadcast scalar. jaxlib 0.10.2's CPU backend then hands the
    product with that broadcast to a YNNPACK fusion that reads it wrongly: with a per-channel decay, most
    compilations of a one-chunk scan returned wrong outputs (up to 1e36), with YNNPACK's default fusions and
    with ``LIBRARY_FUSION_TYPE_DOT`` (not ``INDIVIDUAL_DOT``, nor with the state passed in as an argument).
    ``lax.optimization_barrier`` does not survive XLA's CPU pipeline. So a single chunk reads its state by a
    multiply and a sum, which no library fusion takes (the same Q·P·N multiply-adds per head, once);
    several chunks' stacked states are never a broadcast, and keep the matmul.
    tests/test_scan.py::test_one_chunk_from_a_zero_state_built_in_the_program holds it.
    """
    if single_chunk:
        return jnp.sum(queries[:, :, None, :].astype(acc) * entering[:, None, :, :].astype(acc), axis=-1)
    return jnp.einsum("kln,kpn->klp", queries, entering, preferred_element_type=acc)


def _masked_cumsum(a: jax.Array) -> jax.Array:
    """``out[..., l, s] = Σ_{s < j <= l} a[..., j]`` for l >= s (0 above the diagonal), directly."""
    q = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((q, q), bool), -1)
    return jnp.cumsum(jnp.where(strictly_lower, a[..., :, None], 0), axis=-2)


def _sub_block(q: int) -> int:
    """Largest divisor of ``q`` that is at most 16 (the in-chunk sub-block of :func:`_segsum`)."""
    return max(d for d in range(1, min(q, 16) + 1) if q % d == 0)


def decay_matrix(a: jax.Array) -> jax.Array:
    """``exp(Σ_{s < j <= l} a_j)`` for l >= s and 0 above the diagonal: (..., Q) -> (..., Q, Q).

    The sum is never formed as ``cumsum[l] - cumsum[s]`` (that cancels digits when |cumsum| is large
    and breaks at resets). The chunk is cut into sub-blocks of size b; for l in block K and s in an
    earlier block k the factor splits into three exponentials of direct sums of non-positive terms,
    ``exp(prefix_in_block[l]) · exp(Σ_{k<k'<K} total[k']) · exp(suffix_in_block[s])``, each <= 1, so the
    (Q, Q) matrix costs two multiplications per entry and O(Q·b) exponentials; pairs inside one block
    use a masked cumulative sum of size (b, b).
    """
    q = a.shape[-1]
    blk = _sub_block(q)
    nb = q // blk
    if nb == 1 or blk == 1:
        return jnp.where(jnp.tril(jnp.ones((q, q), bool)), jnp.exp(_masked_cumsum(a)), 0)
    lead = a.shape[:-1]
    ab = a.reshape(*lead, nb, blk)
    in_prefix = jnp.cumsum(ab, axis=-1)  # Σ_{block start <= j <= l}
    in_suffix = _suffix_sums(ab)  # Σ_{s < j <= block end}
    upto = _masked_cumsum(in_prefix[..., -1])  # [K, k] = Σ_{k < k' <= K} total[k']
    between = jnp.concatenate([jnp.zeros_like(upto[..., :1, :]), upto[..., :-1, :]], axis=-2)  # k < k' < K
    earlier = jnp.tril(jnp.ones((nb, nb), bool), -1)
    cross = (jnp.exp(in_prefix)[..., :, :, None, None]
             * jnp.where(earlier, jnp.exp(between), 0)[..., :, None, :, None]
             * jnp.exp(in_suffix)[..., None, None, :, :])  # (..., K, l, k, s)
    within = jnp.where(jnp.tril(jnp.ones((blk, blk), bool)), jnp.exp(_masked_cumsum(ab)), 0)  # (..., K, l, s)
    same = jnp.eye(nb, dtype=bool)[:, None, :, None]
    return jnp.where(same, within[..., :, :, None, :], cross).reshape(*lead, q, q)


def _suffix_sums(a: jax.Array) -> jax.Array:
    """``out[..., s] = Σ_{j > s} a[..., j]`` along the last axis, by a reversed cumsum."""
    incl = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)
    return jnp.concatenate([incl[..., 1:], jnp.zeros_like(incl[..., :1])], axis=-1)


def bonus_term(spec: Recurrence, x, b, c, bonus, acc) -> jax.Array:
    """``((bonus ⊙ c_t)·b_t) x_t`` per head: (batch, seq, H, P) in ``acc`` (RWKV-6's current-token term).

    ``bonus`` is (H, N) or (batch, seq, H, N); ``b, c`` (batch, seq, G, N) are broadcast over the heads
    of their group. It involves step t alone, so it never crosses a reset.
    """
    r = spec.heads_per_group
    bh = jnp.repeat(b.astype(acc), r, axis=-2) if r > 1 else b.astype(acc)
    ch = jnp.repeat(c.astype(acc), r, axis=-2) if r > 1 else c.astype(acc)
    weight = jnp.sum(bonus.astype(acc) * ch * bh, axis=-1)  # (batch, seq, H)
    return weight[..., None] * x.astype(acc)


def finish_readout(spec, y, x, b, c, segment_ids, bonus, exclusive, acc):
    """The exclusive readout's reset mask (``S_{t-1}`` is zero at a document's first token) and the bonus."""
    if exclusive and segment_ids is not None:
        y = jnp.where(segment_starts(segment_ids)[:, :, None, None], jnp.zeros((), y.dtype), y)
    if bonus is not None:
        y = y + bonus_term(spec, x, b, c, bonus, acc)
    return y


def shift_rows(decay):
    """``Γ_{t-1}/Γ_s`` for s < t (0 on and above the diagonal) from ``Γ_t/Γ_s``: rows moved down by one."""
    return jnp.concatenate([jnp.zeros_like(decay[..., :1, :]), decay[..., :-1, :]], axis=-2)


def decayed_scores(left, right, decay, diagonal: bool, acc):
    """``[t, s] = Σ_n left[t, n] right[s, n] decay[(n,) t, s]``: (k, Q, Q) from ``left, right`` (k, Q, N) and a
    decay matrix (k, Q, Q), or (k, N, Q, Q) per state channel (the rank-one kind's score matrices)."""
    if diagonal:
        return jnp.einsum("kln,ksn,knls->kls", left, right, decay, preferred_element_type=acc)
    return jnp.einsum("kln,ksn->kls", left, right, preferred_element_type=acc) * decay


def _outputs(spec: Recurrence, y, final, x, b, c, initial_state, segment_ids, bonus, exclusive: bool, acc):
    """Both kernels' results: ``y`` from chunk-major (batch·chunks·G·R, Q, P) to (batch, seq, H, P) in
    ``x.dtype`` (the exclusive readout's resets and the bonus applied), ``final`` to (batch, H, P, N) in the
    accumulation dtype or ``initial_state.dtype``."""
    batch, seq = x.shape[:2]
    h, p, n, g, r, q = (spec.num_heads, spec.head_dim, spec.state_dim, spec.num_groups, spec.heads_per_group,
                        spec.chunk_size)
    n_chunks = -(-seq // q)
    y = jnp.moveaxis(y.reshape(batch, n_chunks, g, r, q, p), 4, 2)  # (batch, chunk, l, g, r, p)
    y = y.reshape(batch, n_chunks * q, h, p)[:, :seq]
    if exclusive or bonus is not None:
        y = finish_readout(spec, y, x, b, c, segment_ids, bonus, exclusive, acc)
    final_dtype = acc if initial_state is None else initial_state.dtype
    return y.astype(x.dtype), final.reshape(batch, h, p, n).astype(final_dtype)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("exclusive",))
def chunked_scan(spec: Recurrence, x, log_a, b, c, initial_state, segment_ids, w=None, u=None,
                 bonus=None, exclusive=False):
    """:func:`ssdkit.ssd_scan` on one device, inputs already checked against ``spec`` (static).

    Same arguments and results as :func:`ssdkit.ssd_scan` (``initial_state`` and ``segment_ids`` may be
    None): ``(y, final_state)``, y (batch, seq, H, P) in ``x.dtype``, final_state (batch, H, P, N) in the
    accumulation dtype or ``initial_state.dtype``. Compiled once per shape for eager callers. With a
    rank-one term (``spec.rank_one``, ``w`` and ``u`` given) it runs :func:`_rank_one_scan` (the UT form);
    otherwise the code below, unchanged.

    ``exclusive`` (static) reads ``y_t = S_{t-1} c_t``: the in-chunk decays become the strictly lower
    ``Γ_{t-1}/Γ_s`` (s < t) and the entering state is decayed by ``Γ_{t-1}``; at a document's first token
    ``y`` is zero. ``bonus`` ((H, N) or (batch, seq, H, N)) adds the diagonal term ``((bonus ⊙ c_t)·b_t) x_t``.
    """
    if spec.has_rank_one:
        return _rank_one_scan(spec, x, log_a, b, c, initial_state, segment_ids, w, u, bonus, exclusive)
    x_in, b_in, c_in = x, b, c
    # Every contraction below is a canonical batched matmul (batch, m, k) @ (batch, k, n) with one merged
    # leading batch axis: XLA's CPU and GPU emitters run those far faster than dots with scattered or
    # size-1 batch dimensions. Axis letters: z = (batch, chunk, group) merged, r = head within the group,
    # l/s = target/source position in the chunk, p = head dim, n = state dim.
    batch, seq = x.shape[:2]
    p, n, g, r = spec.head_dim, spec.state_dim, spec.num_groups, spec.heads_per_group
    q = spec.chunk_size
    diagonal = spec.decay is DecayKind.DIAGONAL
    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, *state_dtypes)
    mm = functools.partial(jnp.einsum, preferred_element_type=acc)

    a = log_a.astype(acc)
    if segment_ids is not None:
        a = apply_resets(a, segment_ids)

    n_chunks = -(-seq // q)
    pad = n_chunks * q - seq
    if pad:
        def pad_seq(t):
            return jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))

        x, a, b, c = pad_seq(x), pad_seq(a), pad_seq(b), pad_seq(c)

    z = batch * n_chunks * g

    def group_major(t, tail):  # (batch, chunks*q, g, *tail) -> (z, q, *tail)
        t = t.reshape(batch, n_chunks, q, g, *tail)
        return jnp.moveaxis(t, 3, 2).reshape(z, q, *tail)

    xz = group_major(x, (r, p))  # (z, l, r, p)
    bz = group_major(b, (n,))  # (z, s, n)
    cz = group_major(c, (n,))  # (z, l, n)
    if diagonal:
        at = jnp.moveaxis(group_major(a, (r, n)), 1, -1)  # (z, r, n, q)
    else:
        at = jnp.moveaxis(group_major(a, (r,)), 1, -1)  # (z, r, q)

    prefix = jnp.cumsum(at, axis=-1)
    total = prefix[..., -1]
    decay = decay_matrix(at)  # scalar (z, r, l, s); diagonal (z, r, n, l, s)
    w = jnp.exp(_suffix_sums(at))  # decay from each source to the chunk end
    in_decay = jnp.exp(prefix)  # decay from the chunk start to each target
    if exclusive:  # y_t = S_{t-1} c_t: sources s < t decayed to t-1, the entering state by Γ_{t-1}
        decay = shift_rows(decay)
        in_decay = jnp.exp(jnp.concatenate([jnp.zeros_like(prefix[..., :1]), prefix[..., :-1]], axis=-1))
    xh = jnp.moveaxis(xz, 2, 1).reshape(z * r, q, p)  # (z·r, s, p)

    # Intra-chunk (dual form): y[l] = Σ_s (c_l·b_s) decay[l, s] x_s, per head.
    if diagonal:
        scores = jnp.einsum("zln,zsn,zrnls->zrls", cz, bz, decay, preferred_element_type=acc)
    else:
        scores = mm("zln,zsn->zls", cz, bz)[:, None] * decay  # (z, r, l, s)
    y = mm("kls,ksp->klp", scores.reshape(z * r, q, q), xh).reshape(z, r, q, p)

    # Chunk states: S_c = Σ_s w_s x_s ⊗ b_s.
    if diagonal:
        bw = bz[:, None] * jnp.swapaxes(w, -1, -2)  # (z, r, s, n)
        states = mm("ksp,ksn->kpn", xh, bw.reshape(z * r, q, n)).reshape(z, r * p, n)
    else:
        xw = xz * jnp.swapaxes(w, 1, 2)[..., None]  # (z, s, r, p)
        states = mm("zsk,zsn->zkn", xw.reshape(z, q, r * p), bz)  # (z, r·p, n)

    # Inter-chunk recurrence: a scan over chunks, linear in their number.
    states = states.reshape(batch, n_chunks, g, r * p, n)
    if diagonal:
        chunk_decay = jnp.repeat(total, p, axis=1).reshape(batch, n_chunks, g, r * p, n)
    else:
        chunk_decay = jnp.repeat(total, p, axis=1).reshape(batch, n_chunks, g, r * p, 1)
    if initial_state is None:
        h0 = jnp.zeros((batch, g, r * p, n), acc)
    else:
        h0 = initial_state.astype(acc).reshape(batch, g, r * p, n)

    def carry_chunk(state, inputs):
        log_dec, s = inputs
        return jnp.exp(log_dec) * state + s, state

    final, entering = lax.scan(carry_chunk, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
    entering = jnp.moveaxis(entering, 0, 1).reshape(z, r * p, n)  # state entering each chunk

    # The carried state's contribution: y[l] += exp(prefix[l]) (H_c · c_l).
    if diagonal:
        cw = cz[:, None] * jnp.swapaxes(in_decay, -1, -2)  # (z, r, l, n)
        y_off = carried_readout(cw.reshape(z * r, q, n), entering.reshape(z * r, p, n), n_chunks == 1,
                                acc).reshape(z, r, q, p)
    else:
        y_off = mm("zln,zkn->zlk", cz, entering).reshape(z, q, r, p)
        y_off = jnp.moveaxis(y_off * jnp.swapaxes(in_decay, 1, 2)[..., None], 2, 1)  # (z, r, l, p)
    y = y + y_off

    return _outputs(spec, y, final, x_in, b_in, c_in, initial_state, segment_ids, bonus, exclusive, acc)


# ------------------------------------------------------------------------------ diagonal plus rank one
#: Blocks of at most this many rows are inverted by repeated squaring; larger ones split in two first.
SQUARING_BLOCK = 16


def unit_lower_inverse(lower: jax.Array, acc) -> jax.Array:
    """``(I - L)⁻¹`` for strictly lower-triangular ``L`` (..., Q, Q): unit lower triangular, by blocks.

    Split ``I - L = [[I - A, 0], [-C, I - D]]`` at ``h = ⌈Q/2⌉``; its inverse is
    ``[[T_A, 0], [T_D C T_A, T_D]]`` with ``T_A = (I - A)⁻¹``, ``T_D = (I - D)⁻¹`` found the same way, down
    to blocks of at most :data:`SQUARING_BLOCK` rows. A block's ``L`` is nilpotent, so its inverse is
    ``(I + L)(I + L²)(I + L⁴)⋯`` (⌈log2 Q⌉ factors, the powers by squaring). Cost about ``Q³/2`` multiply-adds
    per matrix plus ``2 B² Q log2 B`` for the blocks (B = block size): a few percent of squaring the whole
    Q×Q matrix, and only batched matmuls with static shapes, no loop over positions.
    """
    q = lower.shape[-1]
    if q <= SQUARING_BLOCK:
        eye = jnp.eye(q, dtype=acc)
        inverse, power = eye + lower, lower
        for _ in range((q - 1).bit_length() - 1):  # ⌈log2 Q⌉ factors, the first is I + L
            power = jnp.einsum("...ts,...sm->...tm", power, power, preferred_element_type=acc)
            inverse = inverse + jnp.einsum("...ts,...sm->...tm", inverse, power, preferred_element_type=acc)
        return inverse
    h = -(-q // 2)
    t_a = unit_lower_inverse(lower[..., :h, :h], acc)
    t_d = unit_lower_inverse(lower[..., h:, h:], acc)
    corner = jnp.einsum("...ts,...sm->...tm", t_d,
                        jnp.einsum("...ts,...sm->...tm", lower[..., h:, :h], t_a, preferred_element_type=acc),
                        preferred_element_type=acc)
    top = jnp.concatenate([t_a, jnp.zeros((*t_a.shape[:-1], q - h), acc)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([corner, t_d], axis=-1)], axis=-2)


def unit_lower_solve(lower: jax.Array, rhs: jax.Array, acc) -> jax.Array:
    """``(I - L)⁻¹ rhs`` for strictly lower-triangular ``L`` (..., Q, Q) and ``rhs`` (..., Q, m): the
    inverse by blocks (:func:`unit_lower_inverse`), then one product."""
    return jnp.einsum("...ts,...sm->...tm", unit_lower_inverse(lower, acc), rhs, preferred_element_type=acc)


def _rank_one_scan(spec: Recurrence, x, log_a, b, c, initial_state, segment_ids, w, u, bonus=None, exclusive=False):
    """The chunked scan of ``S_t = S_{t-1} (D_t + w_t u_tᵀ) + x_t ⊗ b_t``, ``y_t = S_t c_t`` (UT form).

    With ``h_t = S_{t-1} w_t`` (a P-vector) the step is a diagonal recurrence with two rank-one inputs,
    ``S_t = S_{t-1} D_t + h_t ⊗ u_t + x_t ⊗ b_t``. Inside a chunk entered with state ``S_0``, with
    ``Γ_t = D_1⋯D_t`` and decays ``Γ_t/Γ_s = exp(Σ_{s<j<=t} a_j)`` (:func:`decay_matrix`, never a ratio)::

        h_t = S_0 (Γ_{t-1} w_t) + Σ_{s<t} [(u_s ⊙ Γ_{t-1}/Γ_s)·w_t] h_s + [(b_s ⊙ Γ_{t-1}/Γ_s)·w_t] x_s

    i.e. ``h = T (W̃ S_0ᵀ + L_bw x)`` with the unit lower-triangular ``T = (I - L_uw)⁻¹`` (Q×Q per chunk
    and head, :func:`unit_lower_solve`), ``W̃_t = Γ_{t-1} ⊙ w_t``. Splitting ``h = h_x + K S_0ᵀ`` with
    ``h_x = T L_bw x`` and ``K = T W̃`` (Q×N, independent of the state)::

        y_t     = Σ_{s<=t} [(b_s ⊙ Γ_t/Γ_s)·c_t] x_s + [(u_s ⊙ Γ_t/Γ_s)·c_t] h_x,s  +  S_0 C̃_t
        C̃_t     = Γ_t ⊙ c_t + Σ_{s<=t} [(u_s ⊙ Γ_t/Γ_s)·c_t] K_s
        S_Q     = S_0 M + R,    M = diag(Γ_Q) + Σ_s K_s ⊗ (u_s ⊙ Γ_Q/Γ_s)     (N×N)
        R       = Σ_s x_s ⊗ (b_s ⊙ Γ_Q/Γ_s) + h_x,s ⊗ (u_s ⊙ Γ_Q/Γ_s)

    so every chunk is summarised by its transition M and input R, and the chunks are joined by the
    linear scan ``H_{c+1} = H_c M_c + R_c`` (a (P×N)·(N×N) product per chunk and head). A reset zeroes
    the decay (as in the diagonal kinds) and ``w`` at a document's first token: the whole transition.
    Padding steps are identities (``a = 0``, ``x = b = c = w = u = 0``). Everything is per head: ``b, c``
    (and per-group ``w, u``) are broadcast over the heads of their group.

    The exclusive readout ``y_t = S_{t-1} c_t`` is the same with ``Γ_{t-1}/Γ_s`` (s < t) in the two readout
    scores and ``Γ_{t-1}`` in ``C̃_t`` (``S_{t-1} = S_0 Γ_{t-1} + Σ_{s<t} (h_s ⊗ u_s + x_s ⊗ b_s) Γ_{t-1}/Γ_s``);
    the chunk transition and input are unchanged.
    """
    x_in, b_in, c_in = x, b, c
    batch, seq = x.shape[:2]
    h, p, n, g, r = spec.num_heads, spec.head_dim, spec.state_dim, spec.num_groups, spec.heads_per_group
    q = spec.chunk_size
    diagonal = spec.decay is DecayKind.DIAGONAL
    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, w.dtype, u.dtype, *state_dtypes)
    mm = functools.partial(jnp.einsum, preferred_element_type=acc)

    a, w, u = log_a.astype(acc), w.astype(acc), u.astype(acc)
    if segment_ids is not None:
        a = apply_resets(a, segment_ids)
        w = jnp.where(segment_starts(segment_ids)[:, :, None, None], jnp.zeros((), acc), w)

    n_chunks = -(-seq // q)
    pad = n_chunks * q - seq
    if pad:
        def pad_seq(t):
            return jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))

        x, a, b, c, w, u = (pad_seq(t) for t in (x, a, b, c, w, u))

    z = batch * n_chunks * g
    k = z * r  # (batch, chunk, group, head in group) merged: one batch axis for every matmul

    def group_major(t, tail):  # (batch, chunks*q, g, *tail) -> (z, q, *tail)
        t = t.reshape(batch, n_chunks, q, g, *tail)
        return jnp.moveaxis(t, 3, 2).reshape(z, q, *tail)

    def per_head(t, width):  # (batch, chunks*q, H, width) -> (k, q, width)
        return jnp.moveaxis(group_major(t, (r, width)), 2, 1).reshape(k, q, width)

    def from_group(t):  # (batch, chunks*q, G, N) -> (k, q, N), each group's row for each of its heads
        return jnp.broadcast_to(group_major(t.astype(acc), (n,))[:, None], (z, r, q, n)).reshape(k, q, n)

    xh = per_head(x.astype(acc), p)  # (k, s, p)
    bh, ch = from_group(b), from_group(c)  # (k, s, n)
    if spec.rank_one is RankOne.GROUPS:
        wh, uh = from_group(w), from_group(u)
    else:
        wh, uh = per_head(w, n), per_head(u, n)
    if diagonal:
        at = jnp.moveaxis(group_major(a, (r, n)), 1, -1).reshape(k, n, q)  # (k, n, q)
    else:
        at = jnp.moveaxis(group_major(a, (r,)), 1, -1).reshape(k, q)  # (k, q)

    def per_position(f):  # a decay factor (k, q) or (k, n, q) as a multiplier of (k, q, n)
        return jnp.swapaxes(f, -1, -2) if diagonal else f[..., None]

    prefix = jnp.cumsum(at, axis=-1)  # Σ_{j<=t} a_j: log Γ_t
    before = jnp.concatenate([jnp.zeros_like(prefix[..., :1]), prefix[..., :-1]], axis=-1)  # log Γ_{t-1}
    total = prefix[..., -1]
    decay = decay_matrix(at)  # Γ_t/Γ_s for t >= s: (k, l, s) or (k, n, l, s)
    shifted = shift_rows(decay)  # Γ_{t-1}/Γ_s, s < t
    to_end = per_position(jnp.exp(_suffix_sums(at)))  # Γ_Q/Γ_s

    def scores(left, right, dec):
        return decayed_scores(left, right, dec, diagonal, acc)

    read, read_prefix = (shifted, before) if exclusive else (decay, prefix)  # Γ_{t-1} or Γ_t
    y_bc = scores(ch, bh, read)  # (k, l, s)
    y_uc = scores(ch, uh, read)
    l_uw = scores(wh, uh, shifted)  # strictly lower
    l_bw = scores(wh, bh, shifted)

    rhs = jnp.concatenate([wh * per_position(jnp.exp(before)), mm("kts,ksp->ktp", l_bw, xh)], axis=-1)
    solved = unit_lower_solve(l_uw, rhs, acc)  # T [W̃ | L_bw x]
    k_state, h_x = solved[..., :n], solved[..., n:]  # (k, q, n), (k, q, p)

    y = mm("kls,ksp->klp", y_bc, xh) + mm("kls,ksp->klp", y_uc, h_x)  # (k, l, p)
    c_state = ch * per_position(jnp.exp(read_prefix)) + mm("kls,ksn->kln", y_uc, k_state)  # C̃ (k, l, n)
    u_end, b_end = uh * to_end, bh * to_end
    inputs = mm("ksp,ksn->kpn", xh, b_end) + mm("ksp,ksn->kpn", h_x, u_end)  # R (k, p, n)
    end_decay = jnp.exp(total)[..., None] if diagonal else jnp.exp(total)[..., None, None]
    transition = mm("ksn,ksm->knm", k_state, u_end) + end_decay * jnp.eye(n, dtype=acc)  # M (k, n, n)

    # Across chunks: H_{c+1} = H_c M_c + R_c, a scan over chunks with one (P×N)·(N×N) product per head.
    inputs = jnp.moveaxis(inputs.reshape(batch, n_chunks, h, p, n), 1, 0)
    transition = jnp.moveaxis(transition.reshape(batch, n_chunks, h, n, n), 1, 0)
    h0 = jnp.zeros((batch, h, p, n), acc) if initial_state is None else initial_state.astype(acc)

    def carry_chunk(state, chunk):
        m, rr = chunk
        return mm("bhpn,bhnm->bhpm", state, m) + rr, state

    final, entering = lax.scan(carry_chunk, h0, (transition, inputs))
    entering = jnp.moveaxis(entering, 0, 1).reshape(k, p, n)  # state entering each chunk
    y = y + carried_readout(c_state, entering, n_chunks == 1, acc)

    return _outputs(spec, y, final, x_in, b_in, c_in, initial_state, segment_ids, bonus, exclusive, acc)

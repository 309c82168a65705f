"""The scan and the conv on a device mesh: a sequence split over the ``seq`` axis, heads over ``model``.

:func:`ssdkit.ssd_scan` and :func:`ssdkit.causal_conv1d` switch to these forms (:func:`sharded_ssd_scan`,
:func:`sharded_causal_conv1d`) by themselves when traced under a mesh (``with jax.set_mesh(mesh)``, or a
train step from :func:`ssdkit.make_train_step` with ``shardings``) whose ``seq`` axis has more than one
device, or (the scan) whose ``model`` axis has more than one device and divides the number of heads. Every
recurrence built on them gets sequence and head parallelism with no change. Inside, every mesh axis is
manual (``jax.shard_map``): batch rows over the batch axes present (``data``, ``fsdp``) when they divide,
positions over ``seq``, heads over ``model``, the rest replicated.

**Heads (tensor parallelism).** Heads never interact in the recurrence, so device ``j`` of ``model`` runs
the chunked scan on its H/m heads alone. B and C are split by group when the groups divide by m;
otherwise every device holds all groups and takes the ones its heads read (with one group, as in the
published Mamba-2 checkpoints, that is the single group: nothing is copied).

**Sequence (context) parallelism.** The SSD recurrence is linear in its state, so a piece's contribution
to the state after it does not depend on the state entering it. Device ``i`` of ``seq`` holds positions
``[i·T', (i+1)·T')`` (T' = seq / devices) and:

1. runs the chunked scan on its piece from a zero state: outputs ``y⁰`` and the piece's own final state
   ``S_i``, plus its total log-decay ``Λ_i = Σ_t log_a_t`` (per head; per state channel when diagonal);
2. all-gathers the pairs ``(Λ_j, S_j)`` (one state per device: B'·H'·P·N numbers, independent of T) and
   folds them in device order, ``E_0 = h0``, ``E_{j+1} = exp(Λ_j) E_j + S_j`` (the inter-chunk recurrence
   one level up; ``E_i`` is the state entering piece ``i``, ``E_devices`` the final state);
3. adds the carried term ``y_t += exp(Σ_{piece start <= j <= t} log_a_j) (E_i · c_t)``.

This is exact (the same sums, reassociated; float32 results agree to rounding) and each device keeps
1/devices of the activations.

**Rank-one transitions** (``w, u``: ``S_t = S_{t-1} (D_t + w_t u_tᵀ) + x_t ⊗ b_t``, the delta-rule family).
Heads split as above, ``w, u`` with B and C when per group, with x when per head. Over ``seq`` the
transitions are N×N matrices that do not commute, so a piece is summarised by its total transition
``M_i = A_1⋯A_T'`` (N×N per head) and its final state ``S_i`` from zero; the pieces' ``(M_j, S_j)`` are
all-gathered and folded in device order, ``E_{j+1} = E_j M_j + S_j``, and ``y_t += E_i (A_1⋯A_t c_t)``. One
chunked scan per piece yields all of them: its state gets N extra rows that start as the identity with no
input (their final state is ``M_i``, their outputs ``A_1⋯A_t c_t``); see :func:`_rank_one_piece`. A
reset drops the whole transition at a document's first token (decay and ``w``), written on the whole
sequence before the split, so a reset at a piece's first token cuts the state carried into it. Costs:
the per-piece scan on P + N rows instead of P, and ``devices · B' · H' · N · (P + N)`` floats gathered.

The short causal convolution needs the K-1 inputs before each piece: a halo of K-1 positions passed to
the next device (``ppermute``), the carried window going to device 0.

Communication per layer and device: the scan all-gathers ``devices · B' · H' · P · N`` floats of states
(B' and H' the local rows and heads; a rank-one kind adds the N×N transitions) and its transpose
reduce-scatters them; the conv sends ``B' · (K-1) · chan`` values to one neighbour. Splitting heads needs no
communication in the scan.

Each device runs the single-device kernels on its share: :func:`ssdkit.core.chunked.chunked_scan` and
:func:`ssdkit.core.conv_kernels.conv_sequence`.

**Short sequences.** A few tokens (speculative decoding's verify of k + 1, a draft model's queue) gain nothing
from a split over ``seq`` and often cannot be split (k + 1 positions in equal pieces of at least K-1). Traced
inside :func:`unsplit_sequence`, the scan and the conv leave the sequence whole: every device of ``seq``
computes it (replicated over ``seq``), heads still split over ``model`` and rows over the batch axes. The
speculative loop traces everything after the prefill this way, and so does Mamba-2's ``verify``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ssdkit.core.chunked import apply_resets, chunked_scan, segment_starts
from ssdkit.core.conv_kernels import conv_sequence
from ssdkit.core.recurrence import DecayKind, RankOne
from ssdkit.dtypes import accumulation_dtype
from ssdkit.sharding import BATCH_AXES

SEQ_AXIS = "seq"
HEAD_AXIS = "model"

_UNSPLIT = contextvars.ContextVar("ssdkit_unsplit_sequence", default=False)


@contextlib.contextmanager
def unsplit_sequence() -> Iterator[None]:
    """Within it, :func:`ssdkit.ssd_scan` and :func:`ssdkit.causal_conv1d` traced under a mesh do not split the
    sequence over its ``seq`` axis: each device of ``seq`` computes the whole sequence (replicated over
    ``seq``; heads still over ``model``, rows over the batch axes). For short sequences of any length, e.g.
    the k + 1 tokens a speculative round verifies. Read while tracing: wrap the trace, not the call of a
    compiled program. Both forms compute the same values (to float rounding); only memory and work differ.
    The setting is not part of ``jax.jit``'s cache key: a function jitted on its own keeps the form it was
    first traced in for equal arguments and mesh (either is correct).
    """
    token = _UNSPLIT.set(True)
    try:
        yield
    finally:
        _UNSPLIT.reset(token)


def _axis_sizes() -> tuple[int, int]:
    """(devices on ``seq``, devices on ``model``) of the mesh being traced under (1 where absent; ``seq``
    counts 1 inside :func:`unsplit_sequence`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1, 1
    manual = set(getattr(mesh, "manual_axes", ()))

    def size(axis):
        return mesh.shape[axis] if axis in mesh.axis_names and axis not in manual else 1

    return (1 if _UNSPLIT.get() else size(SEQ_AXIS)), size(HEAD_AXIS)


def scan_active(num_heads: int) -> bool:
    """True while tracing under a mesh on which :func:`sharded_ssd_scan` splits the sequence or the heads."""
    n, m = _axis_sizes()
    return n > 1 or (m > 1 and num_heads % m == 0)


def conv_active() -> bool:
    """True while tracing under a mesh whose ``seq`` axis has more than one device."""
    return _axis_sizes()[0] > 1


def _rows(batch: int):
    """The batch axes that split ``batch`` rows (None: every device holds every row)."""
    mesh = jax.sharding.get_abstract_mesh()
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not rows or batch % math.prod(mesh.shape[a] for a in rows):
        return None
    return rows


def _check_pieces(seq: int, n: int, what: str) -> None:
    if seq % n:
        raise ValueError(f"{what}: a sequence of {seq} positions cannot be split in {n} equal pieces over the "
                         f"mesh's 'seq' axis; pad it to a multiple of {n}")


# ------------------------------------------------------------------------------ the scan
def sharded_ssd_scan(spec, x, log_a, b, c, initial_state, segment_ids, w=None, u=None):
    """:func:`ssdkit.ssd_scan` (inputs already checked) on the mesh: sequence over ``seq``, heads over
    ``model``. Every kind: scalar or diagonal decay, with or without a rank-one term (``w, u``, given
    exactly when ``spec.has_rank_one``; per group they split like B and C, per head like x)."""
    if spec.has_rank_one != (w is not None and u is not None):
        raise ValueError(f"sharded_ssd_scan: a recurrence with rank-one kind {spec.rank_one.value!r} needs w and u "
                         f"exactly when it has a rank-one term (got w={w is not None}, u={u is not None})")
    batch, seq = x.shape[:2]
    n, m = _axis_sizes()
    _check_pieces(seq, n, "ssd_scan")
    m = m if spec.num_heads % m == 0 else 1
    split_groups = m > 1 and spec.num_groups % m == 0
    s_ax, h_ax, g_ax = (SEQ_AXIS if n > 1 else None), (HEAD_AXIS if m > 1 else None), \
        (HEAD_AXIS if split_groups else None)
    rows = _rows(batch)
    if segment_ids is not None:  # resets written on the whole sequence (the compiler moves one id per piece)
        log_a = apply_resets(log_a, segment_ids)
        if spec.has_rank_one:  # a reset drops the whole transition, its rank-one term too (as chunked_scan)
            w = jnp.where(segment_starts(segment_ids)[:, :, None, None], jnp.zeros((), w.dtype), w)
    args = [x, log_a, b, c]
    in_specs = [P(rows, s_ax, h_ax, None), P(rows, s_ax, h_ax, *([None] * (log_a.ndim - 3))),
                P(rows, s_ax, g_ax, None), P(rows, s_ax, g_ax, None)]
    if spec.has_rank_one:
        r_ax = g_ax if spec.rank_one is RankOne.GROUPS else h_ax
        args += [w, u]
        in_specs += [P(rows, s_ax, r_ax, None)] * 2
    if initial_state is not None:
        args.append(initial_state)
        in_specs.append(P(rows, h_ax, None, None))
    body = functools.partial(_scan_piece, spec, n, m, split_groups, initial_state is not None)
    out_specs = (P(rows, s_ax, h_ax, None), P(rows, h_ax, None, None))
    return jax.shard_map(body, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*args)


def _local_groups(spec, m: int, split_groups: bool, *keys):
    """(the recurrence of this device's H/m heads, and the per-group inputs (B, C; w, u per group) they read)."""
    h_loc = spec.num_heads // m
    if m == 1 or split_groups:  # B and C arrive split like the heads
        return dataclasses.replace(spec, num_heads=h_loc, num_groups=spec.num_groups // m), keys
    first = lax.axis_index(HEAD_AXIS) * h_loc  # this device's first head
    per = spec.heads_per_group
    if per % h_loc == 0 or h_loc % per == 0:  # the local heads read a run of whole groups
        count = max(1, h_loc // per)
        keys = tuple(lax.dynamic_slice_in_dim(t, first // per, count, axis=2) for t in keys)
        return dataclasses.replace(spec, num_heads=h_loc, num_groups=count), keys
    groups = (first + jnp.arange(h_loc)) // per  # heads straddle groups: one group per local head
    keys = tuple(jnp.take(t, groups, axis=2) for t in keys)
    return dataclasses.replace(spec, num_heads=h_loc, num_groups=h_loc), keys


def _scan_piece(spec, n, m, split_groups, with_state, x, log_a, b, c, *rest):
    initial_state = rest[-1] if with_state else None
    if spec.has_rank_one:
        w, u = rest[:2]
        if spec.rank_one is RankOne.GROUPS:
            local, (b, c, w, u) = _local_groups(spec, m, split_groups, b, c, w, u)
        else:
            local, (b, c) = _local_groups(spec, m, split_groups, b, c)
        if n == 1:  # heads split only: the plain scan on this device's heads
            return chunked_scan(local, x, log_a, b, c, initial_state, None, w, u)
        return _rank_one_piece(local, x, log_a, b, c, w, u, initial_state)
    local, (b, c) = _local_groups(spec, m, split_groups, b, c)
    if n == 1:  # heads split only: the plain scan on this device's heads
        return chunked_scan(local, x, log_a, b, c, initial_state, None)
    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, *state_dtypes)
    a = log_a.astype(acc)
    y0, own = chunked_scan(local, x, a, b, c, None, None)  # this piece from a zero state
    total = jnp.sum(a, axis=1)  # (batch, H') or (batch, H', N)
    totals = lax.all_gather(total, SEQ_AXIS)  # (n, ...)
    owns = lax.all_gather(own.astype(acc), SEQ_AXIS)
    diagonal = spec.decay is DecayKind.DIAGONAL
    h = jnp.zeros_like(own, acc) if initial_state is None else initial_state.astype(acc)
    entering = []
    for j in range(n):  # E_{j+1} = exp(Λ_j) E_j + S_j, in device order
        entering.append(h)
        decay = jnp.exp(totals[j])[:, :, None, :] if diagonal else jnp.exp(totals[j])[:, :, None, None]
        h = decay * h + owns[j]
    e = jnp.stack(entering)[lax.axis_index(SEQ_AXIS)]  # (batch, H', P, N): the state entering this piece

    # the carried term: y_t += exp(Σ_{j<=t} a_j) (E · c_t), c read by each head's group
    decay_in = jnp.exp(jnp.cumsum(a, axis=1))  # (batch, T', H') or (batch, T', H', N)
    ch = jnp.repeat(c.astype(acc), local.heads_per_group, axis=2)  # (batch, T', H', N)
    if diagonal:
        carried = jnp.einsum("bhpn,bthn->bthp", e, ch * decay_in, preferred_element_type=acc)
    else:
        carried = jnp.einsum("bhpn,bthn->bthp", e, ch, preferred_element_type=acc) * decay_in[..., None]
    y = (y0.astype(acc) + carried).astype(x.dtype)
    final_dtype = acc if initial_state is None else initial_state.dtype
    return y, h.astype(final_dtype)


def _rank_one_piece(local, x, log_a, b, c, w, u, initial_state):
    """One piece of the sequence with a rank-one transition (resets already in ``log_a`` and ``w``).

    The piece's transitions ``A_t = D_t + w_t u_tᵀ`` (N×N per head) no longer commute, so a piece is
    summarised by its total transition ``M = A_1⋯A_T'`` and needs, for its outputs, the products
    ``C̃_t = A_1⋯A_t c_t``: ``S_t = E A_1⋯A_t + S⁰_t`` gives ``y_t = y⁰_t + E C̃_t``. All of them come from
    one chunked scan of an augmented state (P + N rows): the piece's values from a zero state in the first
    P rows and the identity with no input in the last N, whose state after the piece is ``M`` and whose
    outputs are ``C̃_t``. The pieces' ``(M_j, S_j)`` are all-gathered and folded in device order,
    ``E_{j+1} = E_j M_j + S_j`` (the chunked kernel's inter-chunk recurrence one level up).
    """
    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, w.dtype, u.dtype, *state_dtypes)
    batch, piece, heads, p = x.shape
    nn = local.state_dim
    x_aug = jnp.concatenate([x.astype(acc), jnp.zeros((batch, piece, heads, nn), acc)], axis=-1)
    eye = jnp.broadcast_to(jnp.eye(nn, dtype=acc), (batch, heads, nn, nn))
    s_aug = jnp.concatenate([jnp.zeros((batch, heads, p, nn), acc), eye], axis=2)  # (batch, H', P + N, N)
    aug = dataclasses.replace(local, head_dim=p + nn)
    y_aug, final = chunked_scan(aug, x_aug, log_a, b, c, s_aug, None, w, u)
    y0, c_tilde = y_aug[..., :p], y_aug[..., p:]  # (batch, T', H', P), (batch, T', H', N)
    owns = lax.all_gather(final[:, :, :p], SEQ_AXIS)  # (n, batch, H', P, N): each piece from zero
    moves = lax.all_gather(final[:, :, p:], SEQ_AXIS)  # (n, batch, H', N, N): each piece's transition
    h = jnp.zeros((batch, heads, p, nn), acc) if initial_state is None else initial_state.astype(acc)
    entering = []
    for j in range(owns.shape[0]):  # E_{j+1} = E_j M_j + S_j, in device order
        entering.append(h)
        h = jnp.einsum("bhpn,bhnm->bhpm", h, moves[j], preferred_element_type=acc) + owns[j]
    e = jnp.stack(entering)[lax.axis_index(SEQ_AXIS)]  # (batch, H', P, N): the state entering this piece
    carried = jnp.einsum("bhpn,bthn->bthp", e, c_tilde, preferred_element_type=acc)
    y = (y0 + carried).astype(x.dtype)
    final_dtype = acc if initial_state is None else initial_state.dtype
    return y, h.astype(final_dtype)


# ------------------------------------------------------------------------------ the convolution
def sharded_causal_conv1d(x, weight, bias, window, lengths, segment_ids):
    """:func:`ssdkit.causal_conv1d` (inputs checked, window given) with the sequence split over ``seq``;
    channels over ``model`` when they divide (a depthwise conv needs nothing across channels)."""
    batch, seq, chan = x.shape
    k = weight.shape[0]
    n, m = _axis_sizes()
    _check_pieces(seq, n, "causal_conv1d")
    if seq // n < k - 1:
        raise ValueError(f"causal_conv1d: pieces of {seq // n} positions over the 'seq' axis are shorter than the "
                         f"kernel's {k - 1} past inputs; use fewer 'seq' devices or a longer sequence")
    ch = HEAD_AXIS if m > 1 and chan % m == 0 else None
    rows = _rows(batch)
    ids = jnp.zeros((batch, seq), jnp.int32) if segment_ids is None else segment_ids
    lens = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths
    bias_ = jnp.zeros(weight.shape[1:], weight.dtype) if bias is None else bias
    body = functools.partial(_conv_piece, n, k, segment_ids is not None, lengths is not None)
    in_specs = (P(rows, SEQ_AXIS, ch), P(None, ch), P(ch), P(rows, None, ch), P(rows), P(rows, SEQ_AXIS))
    return jax.shard_map(body, in_specs=in_specs, out_specs=(P(rows, SEQ_AXIS, ch), P(rows, None, ch)),
                         check_vma=False)(x, weight, bias_, window, lens, ids)


def _conv_piece(n, k, packed, ragged, x, weight, bias, window, lengths, ids):
    i = lax.axis_index(SEQ_AXIS)
    piece = x.shape[1]
    forward = [(j, j + 1) for j in range(n - 1)]
    # the K-1 inputs (and their ids) before this piece: the previous piece's last ones, or the carried window
    halo = lax.ppermute(x[:, piece - (k - 1):], SEQ_AXIS, forward)
    halo_ids = lax.ppermute(ids[:, piece - (k - 1):], SEQ_AXIS, forward)
    first = i == 0
    halo = jnp.where(first, window.astype(x.dtype), halo)
    halo_ids = jnp.where(first, jnp.broadcast_to(ids[:, :1], halo_ids.shape), halo_ids)  # the window: doc 0
    ext = jnp.concatenate([halo, x], axis=1)
    ext_ids = jnp.concatenate([halo_ids, ids], axis=1) if packed else None
    local = jnp.clip(lengths - i * piece, 0, piece)  # this piece's real positions
    y, win = conv_sequence(ext, weight, bias, jnp.zeros_like(window, x.dtype), local + (k - 1) if ragged else None,
                           ext_ids)
    # the window after the sequence comes from the piece holding each row's last real token (piece 0 when
    # a row has none: there it is the carried window)
    owner = jnp.clip((lengths - 1) // piece, 0, n - 1)
    win = lax.psum(jnp.where((owner == i)[:, None, None], win, jnp.zeros((), win.dtype)), SEQ_AXIS)
    return y[:, k - 1:], win

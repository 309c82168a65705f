"""Sequence (context) parallelism: one long sequence split in contiguous pieces over the mesh's ``seq`` axis.

The SSD recurrence is linear in its state, so a piece's contribution to the state after it does not depend
on the state entering it. Device ``i`` holds positions ``[i·T', (i+1)·T')`` (T' = seq / devices) and:

1. runs the chunked scan on its piece from a zero state: outputs ``y⁰`` and the piece's own final state
   ``S_i``, plus its total log-decay ``Λ_i = Σ_t log_a_t`` (per head; per state channel when diagonal);
2. all-gathers the pairs ``(Λ_j, S_j)`` (one state per device: B·H·P·N numbers, independent of T) and
   folds them in device order, ``E_0 = h0``, ``E_{j+1} = exp(Λ_j) E_j + S_j`` (the inter-chunk recurrence
   one level up; ``E_i`` is the state entering piece ``i``, ``E_devices`` the final state);
3. adds the carried term ``y_t += exp(Σ_{piece start <= j <= t} log_a_j) (E_i · c_t)``.

This is exact (the same sums, reassociated; float32 results agree to rounding) and each device keeps
1/devices of the activations. The short causal convolution needs the K-1 inputs before each piece: a
halo of K-1 positions passed to the next device (``ppermute``), the carried window going to device 0.

:func:`ssdkit.ssd_scan` and :func:`ssdkit.causal_conv1d` switch to these forms by themselves when traced
under a mesh whose ``seq`` axis has more than one device (``with jax.set_mesh(mesh)``, or a train step from
:func:`ssdkit.make_train_step` with ``shardings``), so every recurrence built on them gets sequence
parallelism with no change. Inside, every mesh axis is manual (``jax.shard_map``): the batch axis is split
over the batch axes present (``data``, ``fsdp``) when its size divides, the sequence over ``seq``, and the
rest is replicated.

Communication per layer and device: the scan all-gathers ``devices`` states and decays
(``devices · B' · H · P · N`` floats, B' the local rows) and its transpose reduce-scatters them; the conv
sends ``B' · (K-1) · chan`` values to one neighbour.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

SEQ_AXIS = "seq"
_BATCH_AXES = ("data", "fsdp")


def active() -> bool:
    """True while tracing under a mesh (``jax.set_mesh``) whose ``seq`` axis has more than one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQ_AXIS not in mesh.axis_names:
        return False
    return mesh.shape[SEQ_AXIS] > 1 and SEQ_AXIS not in _manual_axes(mesh)


def _manual_axes(mesh) -> set:
    try:
        return set(mesh.manual_axes)
    except AttributeError:  # older AbstractMesh
        return set()


def _layout(batch: int, seq: int, what: str):
    """(mesh, batch axes spec entry, devices on seq) for a (batch, seq, ...) input; checks seq divides."""
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape[SEQ_AXIS]
    if seq % n:
        raise ValueError(f"{what}: a sequence of {seq} positions cannot be split in {n} equal pieces over the "
                         f"mesh's 'seq' axis; pad it to a multiple of {n}")
    rows = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if rows and batch % math.prod(mesh.shape[a] for a in rows):
        rows = ()  # rows that do not divide stay whole on every device
    return mesh, (rows or None), n


def _seq_spec(rows, ndim: int) -> P:
    return P(rows, SEQ_AXIS, *([None] * (ndim - 2)))


def _rows_spec(rows, ndim: int) -> P:
    return P(rows, *([None] * (ndim - 1)))


# ------------------------------------------------------------------------------ the scan
def ssd_scan(spec, x, log_a, b, c, initial_state, segment_ids):
    """:func:`ssdkit.ssd_scan` (inputs already checked) with the sequence split over ``seq``."""
    from ssdkit.scan import apply_resets

    batch, seq = x.shape[:2]
    mesh, rows, n = _layout(batch, seq, "ssd_scan")
    if segment_ids is not None:  # resets written on the whole sequence (the compiler moves one id per piece)
        log_a = apply_resets(log_a, segment_ids)
    args = [x, log_a, b, c]
    in_specs = [_seq_spec(rows, a.ndim) for a in args]
    if initial_state is not None:
        args.append(initial_state)
        in_specs.append(_rows_spec(rows, initial_state.ndim))
    out_specs = (_seq_spec(rows, x.ndim), _rows_spec(rows, 4))
    body = functools.partial(_scan_piece, spec, n)
    return jax.shard_map(body, mesh=mesh, in_specs=tuple(in_specs), out_specs=out_specs, check_vma=False)(*args)


def _scan_piece(spec, n, x, log_a, b, c, initial_state=None):
    from ssdkit.dtypes import accumulation_dtype
    from ssdkit.recurrence import DecayKind
    from ssdkit.scan import _chunked_scan

    state_dtypes = () if initial_state is None else (initial_state.dtype,)
    acc = accumulation_dtype(x.dtype, log_a.dtype, b.dtype, c.dtype, *state_dtypes)
    a = log_a.astype(acc)
    y0, own = _chunked_scan(spec, x, a, b, c, None, None)  # this piece from a zero state
    total = jnp.sum(a, axis=1)  # (batch, H) or (batch, H, N)
    totals = lax.all_gather(total, SEQ_AXIS)  # (n, ...)
    owns = lax.all_gather(own.astype(acc), SEQ_AXIS)
    diagonal = spec.decay is DecayKind.DIAGONAL
    h = jnp.zeros_like(own, acc) if initial_state is None else initial_state.astype(acc)
    entering = []
    for j in range(n):  # E_{j+1} = exp(Λ_j) E_j + S_j, in device order
        entering.append(h)
        decay = jnp.exp(totals[j])[:, :, None, :] if diagonal else jnp.exp(totals[j])[:, :, None, None]
        h = decay * h + owns[j]
    e = jnp.stack(entering)[lax.axis_index(SEQ_AXIS)]  # (batch, H, P, N): the state entering this piece

    # the carried term: y_t += exp(Σ_{j<=t} a_j) (E · c_t), c read by each head's group
    decay_in = jnp.exp(jnp.cumsum(a, axis=1))  # (batch, T', H) or (batch, T', H, N)
    ch = jnp.repeat(c.astype(acc), spec.heads_per_group, axis=2)  # (batch, T', H, N)
    if diagonal:
        carried = jnp.einsum("bhpn,bthn->bthp", e, ch * decay_in, preferred_element_type=acc)
    else:
        carried = jnp.einsum("bhpn,bthn->bthp", e, ch, preferred_element_type=acc) * decay_in[..., None]
    y = (y0.astype(acc) + carried).astype(x.dtype)
    final_dtype = acc if initial_state is None else initial_state.dtype
    return y, h.astype(final_dtype)


# ------------------------------------------------------------------------------ the convolution
def causal_conv1d(x, weight, bias, window, lengths, segment_ids):
    """:func:`ssdkit.causal_conv1d` (inputs checked, window given) with the sequence split over ``seq``."""
    batch, seq, _ = x.shape
    k = weight.shape[0]
    mesh, rows, n = _layout(batch, seq, "causal_conv1d")
    if seq // n < k - 1:
        raise ValueError(f"causal_conv1d: pieces of {seq // n} positions over the 'seq' axis are shorter than the "
                         f"kernel's {k - 1} past inputs; use fewer 'seq' devices or a longer sequence")
    ids = jnp.zeros((batch, seq), jnp.int32) if segment_ids is None else segment_ids
    lens = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths
    body = functools.partial(_conv_piece, n, k, segment_ids is not None, lengths is not None)
    in_specs = (_seq_spec(rows, 3), P(), P(), _rows_spec(rows, 3), _rows_spec(rows, 1), _seq_spec(rows, 2))
    bias_ = jnp.zeros(weight.shape[1:], weight.dtype) if bias is None else bias
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(_seq_spec(rows, 3), _rows_spec(rows, 3)),
                         check_vma=False)(x, weight, bias_, window, lens, ids)


def _conv_piece(n, k, packed, ragged, x, weight, bias, window, lengths, ids):
    from ssdkit.conv import _conv_seq

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
    y, win = _conv_seq(ext, weight, bias, jnp.zeros_like(window, x.dtype), local + (k - 1) if ragged else None,
                       ext_ids)
    # the window after the sequence comes from the piece holding each row's last real token (piece 0 when
    # a row has none: there it is the carried window)
    owner = jnp.clip((lengths - 1) // piece, 0, n - 1)
    win = lax.psum(jnp.where((owner == i)[:, None, None], win, jnp.zeros((), win.dtype)), SEQ_AXIS)
    return y[:, k - 1:], win

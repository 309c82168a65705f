"""The chunked SSD scan, public entry point: :func:`ssd_scan` checks its inputs and dispatches.

For one head, ``S_t = exp(a_t) * S_{t-1} + x_t ⊗ b_t,  y_t = S_t · c_t``, computed in chunks of Q steps.
On one device :func:`ssd_scan` runs :func:`ssdkit.core.chunked.chunked_scan` (where the algorithm and
its numerics are described); traced under a mesh that splits the sequence or the heads, it runs
:func:`ssdkit.core.mesh.sharded_ssd_scan`, which runs the same kernel on each device's share.
:func:`preferred_chunk_size` picks the chunk size per backend.
"""

from __future__ import annotations

import jax
import numpy as np

from ssdkit._typing import SegmentIds, SeqKeys, SeqLogDecay, SeqRankOne, SeqValues, State
from ssdkit.core.chunked import chunked_scan
from ssdkit.core.mesh import scan_active, sharded_ssd_scan
from ssdkit.core.recurrence import Recurrence, check_readout

#: The largest chunk that ran fastest per backend (see :func:`preferred_chunk_size`).
_MAX_CHUNK = {"cpu": 64}


def preferred_chunk_size(chunk_size: int, backend: str | None = None) -> int:
    """The chunk size to scan with on ``backend`` (JAX's default backend if None), given a model's own.

    :func:`ssd_scan`'s result does not depend on the chunk size (beyond float rounding), only its cost:
    the intra-chunk work grows with Q and the chunk-state work shrinks. On XLA's CPU backend Q = 64 ran
    fastest (Mamba-2 130M, float32, 2,048 tokens: 614 / 579 / 532 tokens/s at Q = 64 / 128 / 256, one
    alternating run; docs/benchmarks.md), so this returns ``min(chunk_size, 64)`` there and
    ``chunk_size`` on other backends.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    cap = _MAX_CHUNK.get(backend or jax.default_backend())
    return chunk_size if cap is None else min(chunk_size, cap)


def ssd_scan(
    x: SeqValues,
    log_a: SeqLogDecay,
    b: SeqKeys,
    c: SeqKeys,
    *,
    chunk_size: int,
    initial_state: State | None = None,
    segment_ids: SegmentIds | None = None,
    w: SeqRankOne | None = None,
    u: SeqRankOne | None = None,
    bonus: jax.Array | None = None,
    readout: str = "inclusive",
) -> tuple[SeqValues, State]:
    """Chunked SSD scan of ``S_t = exp(log_a_t) * S_{t-1} + x_t ⊗ b_t``, ``y_t = S_t · c_t``.

    With the rank-one factors ``w, u`` (the delta-rule family), the transition is diagonal plus rank one::

        S_t = S_{t-1} A_t + x_t ⊗ b_t,    A_t = diag(exp(log_a_t)) + w_t u_tᵀ,    y_t = S_t · c_t

    Ordering convention: the decay and the rank-one term are one transition ``A_t`` applied to
    ``S_{t-1}`` (rows: values, columns: keys); the decay does not scale the new input ``x_t ⊗ b_t``. A
    convention that decays after the rank-one term, ``S_{t-1} α_t (I - β_t k_t k_tᵀ)``, is the same
    transition with the decay folded into ``w``. Mappings (per head; ``scale`` usually K^-1/2):

    * gated delta rule (Gated DeltaNet, ``S_t = S_{t-1} α_t (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ``,
      ``α_t = exp(g_t)``): ``log_a = g``, ``w = -exp(g)·β·k``, ``u = k``, ``x = v``, ``b = β·k``,
      ``c = q·scale``;
    * delta rule (DeltaNet): the same with ``g = 0``: ``log_a = 0``, ``w = -β·k``;
    * Kimi Delta Attention (per-channel gate ``g`` (..., H, N)): ``log_a = g``, ``w = -β·exp(g) ⊙ k``,
      the rest as the gated delta rule;
    * w = 0: the diagonal kinds (but pass ``w = u = None`` for them: that runs the cheaper kernel).

    Inside a chunk the rank-one part is solved in the UT form (a unit lower-triangular Q×Q system per
    chunk and head, by repeated squaring, no loop over positions); chunks are joined by a scan of
    their (N×N) transitions (``ssdkit.core.chunked``). The mesh forms take ``w, u`` too (heads and
    sequence pieces, :func:`ssdkit.core.mesh.sharded_ssd_scan`), and so do :func:`ssdkit.ssd_verify` /
    :func:`ssdkit.ssd_commit` (speculative rollback).

    Args:
        x: (batch, seq, H, P) values, any float dtype; ``y`` comes back in this dtype.
        log_a: (batch, seq, H) scalar or (batch, seq, H, N) diagonal log-decay, ``<= 0``.
        b: (batch, seq, G, N) keys (Mamba-2's B, already multiplied by dt where relevant).
        c: (batch, seq, G, N) queries (Mamba-2's C). Head h reads group ``h // (H // G)``.
        chunk_size: Q, any positive integer; any ``seq`` works (padded internally).
        initial_state: optional (batch, H, P, N) state before step 0 (float32 or float64).
        segment_ids: optional (batch, seq) integers; the state resets where the id changes (the whole
            transition at a document's first token is dropped, rank-one term included).
        w, u: optional rank-one factors, both (batch, seq, G, N) (per group, like ``b``) or both
            (batch, seq, H, N) (per head); absent: the diagonal kinds, exactly as without them.
        bonus: optional (H, N) (constant over time and batch, RWKV-6's ``u``) or (batch, seq, H, N):
            adds the current token's own term ``y_t += ((bonus ⊙ c_t)·b_t) x_t`` (step t only, so it
            never crosses a reset).
        readout: ``"inclusive"`` (default, ``y_t = S_t c_t``) or ``"exclusive"`` (``y_t = S_{t-1} c_t``:
            the state before step t; ``initial_state`` (or zero) at t = 0, zero at a document's first
            token under ``segment_ids``). RWKV-6 is the exclusive readout plus the bonus with a per-channel
            decay: ``x = v``, ``b = k``, ``c = r``, ``log_a = -exp(ω)``, ``bonus = u`` (our state is the
            transpose of RWKV's (K, V) wkv state). Both work for every kind (rank-one included) and in
            :func:`ssdkit.ssd_step`, :func:`ssdkit.ssd_verify` and :func:`ssdkit.ssd_reference`, but not
            yet under a mesh that splits the sequence or heads (ValueError).

    Returns:
        ``(y, final_state)``: y (batch, seq, H, P) in ``x.dtype``; final_state (batch, H, P, N) in
        the accumulation dtype (float32, or float64 for float64 inputs), or ``initial_state.dtype``.

    Cost: O(seq · Q · (N + P)) per head for the dual form plus O(seq / Q) sequential chunk steps.

    Traced under a mesh (``jax.set_mesh``) whose ``seq`` axis has more than one device, the sequence is
    split in contiguous pieces over it, exactly (seq must divide); whose ``model`` axis divides H, each
    device scans its own heads (:func:`ssdkit.core.mesh.sharded_ssd_scan`).
    """
    spec = Recurrence.from_inputs(x, log_a, b, chunk_size=chunk_size, w=w, u=u)
    spec.check_scan_inputs(x, log_a, b, c, initial_state, segment_ids, w=w, u=u)
    exclusive = check_readout(spec, readout, bonus, np.shape(x)[:2])
    if exclusive or bonus is not None:
        if scan_active(spec.num_heads):
            raise ValueError("ssd_scan's exclusive readout and bonus are not supported under a mesh that splits "
                             "the sequence or the heads yet; run it outside the mesh (or without readout/bonus)")
        return chunked_scan(spec, x, log_a, b, c, initial_state, segment_ids, w, u, bonus, exclusive=exclusive)
    if scan_active(spec.num_heads):  # traced under a mesh with a seq or model axis: split over them
        return sharded_ssd_scan(spec, x, log_a, b, c, initial_state, segment_ids, w, u)
    if spec.has_rank_one:
        return chunked_scan(spec, x, log_a, b, c, initial_state, segment_ids, w, u)
    return chunked_scan(spec, x, log_a, b, c, initial_state, segment_ids)

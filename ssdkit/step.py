"""The O(1) single-step update of the recurrence (decode).

For a scalar decay the readout is taken from the old state, ``y = e^a (S·c) + x (b·c)`` (equal to
``S'·c``), so the state update is the state's only consumer and XLA can update it in place inside a
decode loop (measured: 211 -> 175 ms per step for 130M at batch 16 on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ssdkit._typing import State, StepKeys, StepLogDecay, StepValues
from ssdkit.dtypes import accumulation_dtype
from ssdkit.recurrence import DecayKind, Recurrence


def ssd_step(
    state: State, x: StepValues, log_a: StepLogDecay, b: StepKeys, c: StepKeys
) -> tuple[StepValues, State]:
    """One step: ``S' = exp(log_a) * S + x ⊗ b``, ``y = S' · c``. Cost O(H·P·N), independent of time.

    Args:
        state: (batch, H, P, N) float32 (or float64) recurrent state.
        x: (batch, H, P) values; log_a: (batch, H) or (batch, H, N), ``<= 0``;
        b, c: (batch, G, N) keys and queries; head h reads group ``h // (H // G)``.

    Returns:
        ``(y, new_state)``: y (batch, H, P) in ``x.dtype``; new_state with ``state``'s shape and dtype.
    """
    spec = Recurrence.from_inputs(x, log_a, b, step=True)
    spec.check_step_inputs(state, x, log_a, b, c)
    return _step(spec, state, x, log_a, b, c)


@functools.partial(jax.jit, static_argnums=0)
def _step(spec: Recurrence, state, x, log_a, b, c):
    batch = x.shape[0]
    h, p, n, g, r = spec.num_heads, spec.head_dim, spec.state_dim, spec.num_groups, spec.heads_per_group
    acc = accumulation_dtype(state.dtype, x.dtype, log_a.dtype, b.dtype, c.dtype)

    s = state.astype(acc).reshape(batch, g, r, p, n)
    if spec.decay is DecayKind.SCALAR:
        decay = jnp.exp(log_a.astype(acc)).reshape(batch, g, r, 1, 1)
    else:
        decay = jnp.exp(log_a.astype(acc)).reshape(batch, g, r, 1, n)
    xg = x.astype(acc).reshape(batch, g, r, p, 1)
    bg = b.astype(acc).reshape(batch, g, 1, 1, n)
    cg = c.astype(acc)
    if spec.decay is DecayKind.SCALAR:
        # y = S'·c = e^a (S·c) + x (b·c): the readout uses the old state, so the update below is the
        # state's only consumer and XLA can write it in place (no copy of the state per step).
        sc = jnp.einsum("bgrpn,bgn->bgrp", s, cg, preferred_element_type=acc)
        bc = jnp.sum(bg[:, :, 0, 0] * cg, axis=-1)[:, :, None, None]
        y = decay[..., 0] * sc + xg[..., 0] * bc
        s = decay * s + xg * bg
    else:
        s = decay * s + xg * bg
        y = jnp.einsum("bgrpn,bgn->bgrp", s, cg, preferred_element_type=acc)
    return y.reshape(batch, h, p).astype(x.dtype), s.reshape(batch, h, p, n).astype(state.dtype)

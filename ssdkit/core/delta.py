"""The delta rule and its gated forms as the scan's diagonal-plus-rank-one inputs.

The published layers (DeltaNet, Gated DeltaNet, Kimi Delta Attention) write their recurrence on a (K, V)
state ``H``; ssdkit's state is its transpose ``S = Hᵀ`` (P, N) = (V, K). Per head, with ``α_t = exp(g_t)``
(a scalar, or one per key channel), ``β_t`` a scalar, keys ``k_t`` and values ``v_t``::

    decay first (flash-linear-attention's naive gated delta rule and KDA: decay, then the delta step)
        H_t = (I - β_t k_t k_tᵀ) diag(α_t) H_{t-1} + β_t k_t v_tᵀ
        S_t = S_{t-1} (diag(α_t) - β_t (α_t ⊙ k_t) k_tᵀ) + β_t v_t k_tᵀ
            → log_a = g,  w = -β·(α ⊙ k),  u = k,  b = β·k,  x = v,  c = scale·q
    decay last
        H_t = diag(α_t) (I - β_t k_t k_tᵀ) H_{t-1} + β_t k_t v_tᵀ
        S_t = S_{t-1} (diag(α_t) - β_t k_t (α_t ⊙ k_t)ᵀ) + β_t v_t k_tᵀ
            → log_a = g,  w = -β·k,  u = α ⊙ k,  b = β·k,  x = v,  c = scale·q

and ``y_t = S_t c_t`` (``o_t = H_tᵀ q_t · scale``). For a scalar decay per head (DeltaNet: ``g = 0``; Gated
DeltaNet) the two orders are the same recurrence. Note that the new input ``β v kᵀ`` is not decayed in
either: the decay acts on the carried state only, as in every published form.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

#: The two orderings of decay and delta step (module docstring).
ORDERS = ("decay_first", "decay_last")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaInputs:
    """The arguments of :func:`ssdkit.ssd_scan` (or ``ops.scan``, :func:`ssdkit.ssd_step`) for a delta
    rule: ``ssd_scan(d.x, d.log_a, d.b, d.c, w=d.w, u=d.u, ...)``. Keys and queries are per head (one group
    per head: ``b``, ``c``, ``w``, ``u`` are (..., H, N)); ``log_a`` is (..., H) or (..., H, N)."""

    x: Float[Array, "*lead heads hdim"]
    log_a: jax.Array
    b: Float[Array, "*lead heads state"]
    c: Float[Array, "*lead heads state"]
    w: Float[Array, "*lead heads state"]
    u: Float[Array, "*lead heads state"]


def delta_rule(
    q: Float[Array, "*lead groups state"],
    k: Float[Array, "*lead groups state"],
    v: Float[Array, "*lead heads hdim"],
    beta: Float[Array, "*lead heads"],
    g: jax.Array | None = None,
    *,
    scale: float | None = None,
    order: str = "decay_first",
) -> DeltaInputs:
    """The (gated) delta rule's scan inputs (module docstring), in flash-linear-attention's argument meaning.

    Args:
        q, k: (..., G, N) queries and keys (normalise them first where the layer does: DeltaNet's L2 norm);
            G divides H, and head h reads group ``h // (H // G)``.
        v: (..., H, P) values.
        beta: (..., H) the step sizes β (sigmoid outputs in the published layers).
        g: the log of the decay α: None (DeltaNet: no decay), (..., H) per head (Gated DeltaNet) or
            (..., H, N) per head and key channel (KDA). ``g <= 0``.
        scale: the query scale, default ``N ** -0.5``.
        order: ``"decay_first"`` (flash-linear-attention's) or ``"decay_last"``; the same for a per-head g.

    ``...`` is (batch, seq) for :func:`ssdkit.ssd_scan` or (batch,) for :func:`ssdkit.ssd_step`.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    heads, groups, n = np.shape(v)[-2], np.shape(k)[-2], np.shape(k)[-1]
    if np.shape(q) != np.shape(k) or heads % groups or np.shape(beta) != np.shape(v)[:-1]:
        raise ValueError(f"delta_rule: q and k must be (..., G, N) alike with G dividing v's H, beta (..., H); "
                         f"got q {np.shape(q)}, k {np.shape(k)}, v {np.shape(v)}, beta {np.shape(beta)}")
    if g is not None and np.shape(g) not in (np.shape(beta), (*np.shape(beta), n)):
        raise ValueError(f"delta_rule: g must be (..., H) {np.shape(beta)} or (..., H, N) {(*np.shape(beta), n)}, "
                         f"got {np.shape(g)}")
    q, k = (jnp.repeat(a, heads // groups, axis=-2) for a in (q, k))
    scale = n**-0.5 if scale is None else scale
    bk = beta[..., None] * k
    if g is None:
        log_a = jnp.zeros(np.shape(beta), jnp.result_type(v, beta))
        w, u = -bk, k
    else:
        alpha = jnp.exp(g)
        alpha = alpha[..., None] if jnp.ndim(g) == jnp.ndim(beta) else alpha
        log_a = g
        w, u = (-alpha * bk, k) if order == "decay_first" else (-bk, alpha * k)
    return DeltaInputs(x=v, log_a=log_a, b=bk, c=q * scale, w=w, u=u)

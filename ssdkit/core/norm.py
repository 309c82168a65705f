"""RMSNorm, Mamba-2's gated group RMSNorm, the L2 norm and LayerNorm / GroupNorm. Computed in float32,
returned in the input dtype.

Over the last axis (size d)::

    rms_norm(x)          = x / sqrt(mean(x²) + eps) ⊙ weight
    gated_rms_norm(y, z) = weight ⊙ GroupRMSNorm(y ⊙ silu(z))
    l2_norm(x)           = x / sqrt(sum(x²) + eps)
    layer_norm(x)        = weight ⊙ GroupLayerNorm(x) + bias

where ``GroupRMSNorm`` splits the d features into ``num_groups`` contiguous groups of d / num_groups
and normalises each on its own: for group g holding features ``u_g``, ``u_g / sqrt(mean(u_g²) + eps)``.
This is mamba_ssm's ``RMSNormGated(norm_before_gate=False, group_size=d / ngroups)``; with one group it
is plain RMSNorm of the gated input. ``l2_norm`` is the delta-rule layers' query/key normalisation
(flash-linear-attention's ``l2norm``, eps 1e-6, no weight). The mean (sum) of squares and the scaling are
done in float32 (float64 for float64 inputs) whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ssdkit.dtypes import accumulation_dtype, check_floating, is_concrete

#: Features: any leading axes, normalised over the last one (size d).
Features = Float[Array, "*batch d"]
#: Per-feature scale.
Weight = Float[Array, " d"]


def _check(name: str, x, weight) -> None:
    check_floating(name, x)
    check_floating("weight", weight)
    if np.ndim(x) < 1:
        raise ValueError(f"{name} must have at least one axis (the features to normalise), got a scalar")
    if np.shape(weight) != np.shape(x)[-1:]:
        raise ValueError(
            f"weight must have shape ({np.shape(x)[-1]},) to match the last axis of {name} "
            f"{np.shape(x)}, got {np.shape(weight)}"
        )


def _check_eps(eps) -> None:
    bad = isinstance(eps, bool | str) or np.ndim(eps) != 0
    if not bad and is_concrete(eps):
        bad = not float(eps) >= 0  # also catches NaN
    if bad:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def _normalise(u, eps):
    """``u / sqrt(mean(u², -1) + eps)`` in ``u``'s dtype."""
    return u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + eps)


def rms_norm(x: Features, weight: Weight, *, eps: float = 1e-5) -> Features:
    """``x / sqrt(mean(x², -1) + eps) * weight``.

    Args:
        x: (..., d) features, any float dtype.
        weight: (d,) per-feature scale.
        eps: non-negative constant added to the mean of squares.

    Returns:
        (..., d) in ``x.dtype``; computed in float32 (float64 when ``x`` is float64).
    """
    _check("x", x, weight)
    _check_eps(eps)
    return _rms_norm(x, weight, eps)


def gated_rms_norm(y: Features, z: Features, weight: Weight, *, num_groups: int = 1, eps: float = 1e-5) -> Features:
    """Mamba-2's gated norm ``weight ⊙ GroupRMSNorm(y ⊙ silu(z))`` (gate first, then normalise).

    Args:
        y: (..., d) features (Mamba-2: the SSD output plus the D skip), any float dtype.
        z: (..., d) gate, same shape as ``y``.
        weight: (d,) per-feature scale.
        num_groups: number of contiguous groups of ``d / num_groups`` features, each normalised on its
            own; must divide d (Mamba-2 uses its ``ngroups``).
        eps: non-negative constant added to each group's mean of squares.

    Returns:
        (..., d) in ``y.dtype``; computed in float32 (float64 when ``y`` or ``z`` is float64).
    """
    _check("y", y, weight)
    check_floating("z", z)
    _check_eps(eps)
    if np.shape(z) != np.shape(y):
        raise ValueError(f"z must have the shape of y {np.shape(y)}, got {np.shape(z)}")
    d = np.shape(y)[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or num_groups < 1 or d % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the feature size d={d} (the last axis of y), "
            f"got {num_groups!r}"
        )
    return _gated_rms_norm(y, z, weight, eps, int(num_groups))


def l2_norm(x: Features, *, eps: float = 1e-6) -> Features:
    """``x / sqrt(sum(x², -1) + eps)``: unit vectors along the last axis (the delta rule's keys and queries).

    Args:
        x: (..., d) vectors, any float dtype.
        eps: non-negative constant added to the sum of squares; 1e-6 is flash-linear-attention's
            (``use_qk_l2norm_in_kernel``), so a zero vector stays zero.

    Returns:
        (..., d) in ``x.dtype``; computed in float32 (float64 when ``x`` is float64).
    """
    check_floating("x", x)
    _check_eps(eps)
    if np.ndim(x) < 1:
        raise ValueError("x must have at least one axis (the vectors to normalise), got a scalar")
    return _l2_norm(x, eps)


def layer_norm(x: Features, weight: Weight, bias: Weight, *, num_groups: int = 1, eps: float = 1e-5) -> Features:
    """``weight ⊙ GroupLayerNorm(x) + bias``: each of ``num_groups`` contiguous groups ``u`` of the last axis
    becomes ``(u - mean(u)) / sqrt(var(u) + eps)`` (biased variance), then the per-feature affine map.

    One group is torch's ``LayerNorm(d, eps)``; G groups are torch's ``GroupNorm(G, d, eps)`` applied to d
    channels (RWKV-6/7's output norm with one group per head).

    Args:
        x: (..., d) features, any float dtype.
        weight, bias: (d,) per-feature scale and shift.
        num_groups: a positive divisor of d.
        eps: non-negative constant added to each group's variance.

    Returns:
        (..., d) in ``x.dtype``; computed in float32 (float64 when ``x`` is float64).
    """
    _check("x", x, weight)
    check_floating("bias", bias)
    if np.shape(bias) != np.shape(x)[-1:]:
        raise ValueError(f"bias must have shape ({np.shape(x)[-1]},) to match the last axis of x {np.shape(x)}, "
                         f"got {np.shape(bias)}")
    _check_eps(eps)
    d = np.shape(x)[-1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer) or num_groups < 1 or d % num_groups:
        raise ValueError(
            f"num_groups must be a positive divisor of the feature size d={d} (the last axis of x), "
            f"got {num_groups!r}"
        )
    return _layer_norm(x, weight, bias, eps, int(num_groups))


# One compiled program per shape for eager callers; inside a caller's jit these simply inline.
@jax.jit
def _rms_norm(x, weight, eps):
    acc = accumulation_dtype(x.dtype)
    out = _normalise(x.astype(acc), eps)
    return (out * weight.astype(acc)).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=4)
def _gated_rms_norm(y, z, weight, eps, num_groups: int):
    d = y.shape[-1]
    acc = accumulation_dtype(y.dtype, z.dtype)
    g = y.astype(acc) * jax.nn.silu(z.astype(acc))
    g = _normalise(g.reshape(*g.shape[:-1], num_groups, d // num_groups), eps)
    return (g.reshape(*g.shape[:-2], d) * weight.astype(acc)).astype(y.dtype)


@jax.jit
def _l2_norm(x, eps):
    acc = accumulation_dtype(x.dtype)
    u = x.astype(acc)
    return (u * jax.lax.rsqrt(jnp.sum(u * u, axis=-1, keepdims=True) + eps)).astype(x.dtype)


@functools.partial(jax.jit, static_argnums=4)
def _layer_norm(x, weight, bias, eps, num_groups: int):
    d = x.shape[-1]
    acc = accumulation_dtype(x.dtype)
    u = x.astype(acc).reshape(*x.shape[:-1], num_groups, d // num_groups)
    u = _normalise(u - jnp.mean(u, axis=-1, keepdims=True), eps)
    return (u.reshape(x.shape) * weight.astype(acc) + bias.astype(acc)).astype(x.dtype)

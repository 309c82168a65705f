"""RMSNorm and Mamba-2's gated group RMSNorm. Computed in float32, returned in the input dtype.

    rms_norm(x)          = x / sqrt(mean(x²) + eps) ⊙ weight
    gated_rms_norm(y, z) = weight ⊙ GroupRMSNorm(y ⊙ silu(z))     (norm over groups of d / G channels)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ssdkit.dtypes import accumulation_dtype, check_floating

Features = Float[Array, "*batch d"]
Weight = Float[Array, " d"]


def _check(name: str, x, weight) -> None:
    check_floating(name, x)
    check_floating("weight", weight)
    if np.shape(weight) != np.shape(x)[-1:]:
        raise ValueError(f"weight must have shape ({np.shape(x)[-1]},) to match {name}, got {np.shape(weight)}")


def rms_norm(x: Features, weight: Weight, *, eps: float = 1e-5) -> Features:
    """``x / sqrt(mean(x², -1) + eps) * weight``, in float32, returned in ``x.dtype``."""
    _check("x", x, weight)
    acc = accumulation_dtype(x.dtype)
    xf = x.astype(acc)
    out = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (out * weight.astype(acc)).astype(x.dtype)


def gated_rms_norm(y: Features, z: Features, weight: Weight, *, num_groups: int = 1, eps: float = 1e-5) -> Features:
    """``weight ⊙ GroupRMSNorm(y ⊙ silu(z))``: the last axis is split into ``num_groups`` groups of
    ``d / num_groups`` channels, each normalised on its own (mamba_ssm's RMSNormGated with
    ``norm_before_gate=False``). Computed in float32, returned in ``y.dtype``."""
    _check("y", y, weight)
    check_floating("z", z)
    if np.shape(z) != np.shape(y):
        raise ValueError(f"z must have the shape of y {np.shape(y)}, got {np.shape(z)}")
    d = np.shape(y)[-1]
    if not isinstance(num_groups, int) or num_groups < 1 or d % num_groups:
        raise ValueError(f"num_groups must be a positive divisor of the feature size {d}, got {num_groups!r}")
    acc = accumulation_dtype(y.dtype, z.dtype)
    g = y.astype(acc) * jax.nn.silu(z.astype(acc))
    g = g.reshape(*g.shape[:-1], num_groups, d // num_groups)
    g = g * jax.lax.rsqrt(jnp.mean(g * g, axis=-1, keepdims=True) + eps)
    return (g.reshape(*g.shape[:-2], d) * weight.astype(acc)).astype(y.dtype)

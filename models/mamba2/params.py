"""Mamba-2 parameters: a PyTree with the layers stacked on a leading axis.

Layouts (chosen for the contractions the model does, converted once at load time):

    embedding     (V_pad, d_model)
    layers.norm          (L, d_model)            pre-mixer RMSNorm weight
    layers.in_proj       (L, d_in_proj, d_model) torch Linear layout (out, in), contracted on `in`
    layers.conv_weight   (L, d_conv, conv_dim)   time-major: conv_weight[k, c] = conv1d.weight[c, 0, k]
    layers.conv_bias     (L, conv_dim)
    layers.dt_bias       (L, H)                  float32 always
    layers.A_log         (L, H)                  float32 always
    layers.D             (L, H)                  float32 always
    layers.gate_norm     (L, d_inner)            gated RMSNorm weight
    layers.out_proj      (L, d_model, d_inner)   (out, in)
    norm_f        (d_model,)
    lm_head       (V_pad, d_model), or None when tied to the embedding
"""

from __future__ import annotations

import dataclasses

import jax

#: Parameters kept in float32 whatever the weight dtype (A = -exp(A_log) overflows in float16).
FLOAT32_LAYER_FIELDS = ("dt_bias", "A_log", "D")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mamba2LayerParams:
    """Per-layer weights, each stacked over layers on axis 0."""

    norm: jax.Array
    in_proj: jax.Array
    conv_weight: jax.Array
    conv_bias: jax.Array
    dt_bias: jax.Array
    A_log: jax.Array
    D: jax.Array
    gate_norm: jax.Array
    out_proj: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mamba2Params:
    """All weights of a Mamba-2 language model."""

    embedding: jax.Array
    layers: Mamba2LayerParams
    norm_f: jax.Array
    lm_head: jax.Array | None = None


def layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Shape of each stacked layer field for config ``cfg`` (leading axis n_layer)."""
    n = cfg.n_layer
    return {
        "norm": (n, cfg.d_model),
        "in_proj": (n, cfg.d_in_proj, cfg.d_model),
        "conv_weight": (n, cfg.d_conv, cfg.conv_dim),
        "conv_bias": (n, cfg.conv_dim),
        "dt_bias": (n, cfg.nheads),
        "A_log": (n, cfg.nheads),
        "D": (n, cfg.nheads),
        "gate_norm": (n, cfg.d_inner),
        "out_proj": (n, cfg.d_model, cfg.d_inner),
    }

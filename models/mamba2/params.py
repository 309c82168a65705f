"""Mamba-2 parameters: a PyTree of weights, its layers per layer (a tuple) or stacked.

``layers`` comes in one of two layouts (``ssdkit.stack``), and every function takes both:

* **per layer** (the default of :func:`init_params` and ``load_checkpoint``): a tuple of
  :class:`Mamba2LayerParams` without a layer axis. The stack runs unrolled and every layer reads its
  weights in place: the fastest decode (about 2-4x the stacked layout's on CPU) and short prefill.
* **stacked**: one :class:`Mamba2LayerParams` whose arrays carry the layer axis first; the stack runs as
  one ``lax.scan`` (compile time constant in depth, less scratch memory on long sequences). Decode
  entry points split it once and cache the copy (``models.mamba2.model._decode_layout``).

Array layouts (chosen for the contractions the model does, converted once at load time); the leading
``L`` is there only when stacked:

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
import jax.numpy as jnp

from ssdkit.stack import is_per_layer, stack, unstack

#: Parameters kept in float32 whatever the weight dtype (A = -exp(A_log) overflows in float16).
FLOAT32_LAYER_FIELDS = ("dt_bias", "A_log", "D")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mamba2LayerParams:
    """One layer's weights (per-layer layout), or every layer's stacked on axis 0 (stacked layout)."""

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
    layers: tuple[Mamba2LayerParams, ...] | Mamba2LayerParams  # per layer (default), or stacked
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


def init_params(cfg, key: jax.Array, dtype=jnp.float32, *, stacked: bool = False) -> Mamba2Params:
    """Random parameters with mamba_ssm's initialisation; traceable (``jax.eval_shape`` works).

    * embedding ~ N(0, 0.02); LM head tied (None) unless ``cfg.tie_embeddings`` is False;
    * in_proj, out_proj: torch Linear default U(±1/sqrt(fan_in)); out_proj then scaled by
      1/sqrt(n_layer) (GPT-2 style prenorm-residual rescaling, one residual per layer);
    * conv weight and bias: torch Conv1d default U(±1/sqrt(d_conv)) (depthwise: fan_in = d_conv);
    * dt = exp(U(log dt_min, log dt_max)) floored at dt_init_floor, dt_bias = softplus⁻¹(dt);
    * A_log = log(U(A_init_range)), D = 1, norm weights 1.

    Matrices come back in ``dtype``; dt_bias, A_log, D in float32. Layers come per layer (a tuple: the
    layout every path runs fastest in, decode above all); ``stacked=True`` gives the same values stacked
    on a leading layer axis (one ``lax.scan`` over layers: constant compile time in depth).
    """
    n = cfg.n_layer
    k_embed, k_head, k_layers = jax.random.split(key, 3)

    def uniform(k, shape, bound, dt=dtype):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dt)

    def layer(k) -> Mamba2LayerParams:
        ks = jax.random.split(k, 6)
        log_lo, log_hi = jnp.log(cfg.dt_min), jnp.log(cfg.dt_max)
        dt = jnp.exp(jax.random.uniform(ks[3], (cfg.nheads,), jnp.float32) * (log_hi - log_lo) + log_lo)
        dt = jnp.maximum(dt, cfg.dt_init_floor)
        lo, hi = cfg.A_init_range
        return Mamba2LayerParams(
            norm=jnp.ones((cfg.d_model,), dtype),
            in_proj=uniform(ks[0], (cfg.d_in_proj, cfg.d_model), cfg.d_model**-0.5),
            conv_weight=uniform(ks[1], (cfg.d_conv, cfg.conv_dim), cfg.d_conv**-0.5),
            conv_bias=uniform(ks[2], (cfg.conv_dim,), cfg.d_conv**-0.5),
            dt_bias=dt + jnp.log(-jnp.expm1(-dt)),
            A_log=jnp.log(jax.random.uniform(ks[4], (cfg.nheads,), jnp.float32, lo, hi)),
            D=jnp.ones((cfg.nheads,), jnp.float32),
            gate_norm=jnp.ones((cfg.d_inner,), dtype),
            out_proj=(uniform(ks[5], (cfg.d_model, cfg.d_inner), cfg.d_inner**-0.5, jnp.float32)
                      / jnp.sqrt(n)).astype(dtype),
        )

    layers = tuple(layer(jax.random.fold_in(k_layers, i)) for i in range(n))
    embedding = (0.02 * jax.random.normal(k_embed, (cfg.padded_vocab_size, cfg.d_model))).astype(dtype)
    lm_head = None
    if not cfg.tie_embeddings:
        lm_head = (0.02 * jax.random.normal(k_head, (cfg.padded_vocab_size, cfg.d_model))).astype(dtype)
    return Mamba2Params(embedding=embedding, layers=stack(layers) if stacked else layers,
                        norm_f=jnp.ones((cfg.d_model,), dtype), lm_head=lm_head)


def cast_params(params: Mamba2Params, dtype) -> Mamba2Params:
    """Cast the weight matrices and norms to ``dtype``; dt_bias, A_log and D stay float32."""

    def cast_layer(lp: Mamba2LayerParams) -> Mamba2LayerParams:
        return dataclasses.replace(lp, **{
            f.name: getattr(lp, f.name).astype(jnp.float32 if f.name in FLOAT32_LAYER_FIELDS else dtype)
            for f in dataclasses.fields(lp)})

    layers = tuple(map(cast_layer, params.layers)) if is_per_layer(params.layers) else cast_layer(params.layers)
    return Mamba2Params(
        embedding=params.embedding.astype(dtype), layers=layers, norm_f=params.norm_f.astype(dtype),
        lm_head=None if params.lm_head is None else params.lm_head.astype(dtype),
    )


def unstack_layers(params: Mamba2Params) -> Mamba2Params:
    """The same weights with ``layers`` as a tuple of per-layer params (see ``ssdkit.stack``).

    The default layout (``init_params``, ``load_checkpoint``): decode reads each layer's weights in place
    instead of slicing (and, on CPU, copying) them out of the stacked arrays every step. A no-op for
    per-layer params; for stacked ones it costs one copy of the layer weights (drop the stacked params).
    """
    return dataclasses.replace(params, layers=unstack(params.layers))


def stack_layers(params: Mamba2Params) -> Mamba2Params:
    """The stacked layout (layers on a leading axis; one ``lax.scan`` over layers): a no-op if stacked."""
    return dataclasses.replace(params, layers=stack(params.layers))

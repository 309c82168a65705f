"""Mamba-2 parameters: a PyTree of weights, its layers per layer (a tuple) or stacked.

``layers`` comes in one of two layouts (``ssdkit.core.layers``), and every function takes both:

* **per layer** (the default of :func:`init_params` and ``load_checkpoint``): a tuple of
  :class:`Mamba2LayerParams` without a layer axis. The stack runs unrolled and every layer reads its
  weights in place: the fastest decode (about 2-4x the stacked layout's on CPU) and short prefill.
* **stacked**: one :class:`Mamba2LayerParams` whose arrays carry the layer axis first; the stack runs as
  one ``lax.scan`` (compile time constant in depth, less scratch memory on long sequences). Decode
  generation loops split it once per call, inside the compiled program (``Mamba2LM.prepare``).

Array layouts (chosen for the contractions the model does and for splitting by head over a mesh's
``model`` axis; converted once at load and save time, :func:`from_checkpoint_layout`); the leading ``L``
is there only when stacked:

    embedding                (V_pad, d_model)
    layers.norm              (L, d_model)           pre-mixer RMSNorm weight
    layers.in_proj_heads     (L, H, 2P, d_model)    per head h: the rows of z_h (P), then x_h (P)
    layers.in_proj_dt        (L, H, d_model)        per head h: the row of dt_h
    layers.in_proj_groups    (L, G, 2N, d_model)    per group g: the rows of B_g (N), C_g (N)
    layers.conv_x_weight     (L, K, H·P)            the conv of x, time-major: [k, c] = conv1d.weight[c, 0, k]
    layers.conv_x_bias       (L, H·P)
    layers.conv_bc_weight    (L, K, G·2N)           the conv of B and C, channels group-major (g, B|C, n)
    layers.conv_bc_bias      (L, G·2N)
    layers.dt_bias           (L, H)                 float32 always
    layers.A_log             (L, H)                 float32 always
    layers.D                 (L, H)                 float32 always
    layers.gate_norm         (L, H·P)               gated RMSNorm weight
    layers.out_proj          (L, d_model, H·P)      (out, in)
    norm_f        (d_model,)
    lm_head       (V_pad, d_model), or None when tied to the embedding

Every per-head quantity has the head on an axis of its own or as the major part of an axis, and every
per-group one the group, so a contiguous split of that axis is a split by head (or group): tensor
parallelism (``ssdkit.models.mamba2.sharding``) keeps the scan, the step and the conv of x local to a device.
The published checkpoints concatenate ``in_proj``'s rows as [z | x | B | C | dt] and the conv's channels
as [x | B | C]; :func:`from_checkpoint_layout` and :func:`to_checkpoint_layout` convert.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit.core.layers import is_per_layer, stack, unstack

#: Parameters kept in float32 whatever the weight dtype (A = -exp(A_log) overflows in float16).
FLOAT32_LAYER_FIELDS = ("dt_bias", "A_log", "D")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mamba2LayerParams:
    """One layer's weights (per-layer layout), or every layer's stacked on axis 0 (stacked layout)."""

    norm: jax.Array
    in_proj_heads: jax.Array
    in_proj_dt: jax.Array
    in_proj_groups: jax.Array
    conv_x_weight: jax.Array
    conv_x_bias: jax.Array
    conv_bc_weight: jax.Array
    conv_bc_bias: jax.Array
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
    n, h, p, g, s = cfg.n_layer, cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
    return {
        "norm": (n, cfg.d_model),
        "in_proj_heads": (n, h, 2 * p, cfg.d_model),
        "in_proj_dt": (n, h, cfg.d_model),
        "in_proj_groups": (n, g, 2 * s, cfg.d_model),
        "conv_x_weight": (n, cfg.d_conv, cfg.d_inner),
        "conv_x_bias": (n, cfg.d_inner),
        "conv_bc_weight": (n, cfg.d_conv, 2 * g * s),
        "conv_bc_bias": (n, 2 * g * s),
        "dt_bias": (n, h),
        "A_log": (n, h),
        "D": (n, h),
        "gate_norm": (n, cfg.d_inner),
        "out_proj": (n, cfg.d_model, cfg.d_inner),
    }


#: The fields of the published layout (one tensor each in a checkpoint), per layer:
#: in_proj (d_in_proj, d_model) rows [z | x | B | C | dt]; conv_weight (K, conv_dim) and conv_bias
#: (conv_dim,) channels [x | B | C]; the other fields as in :class:`Mamba2LayerParams`.
CHECKPOINT_FIELDS = ("norm", "in_proj", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "gate_norm", "out_proj")


def checkpoint_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Per-layer shapes of the published layout's fields (:data:`CHECKPOINT_FIELDS`)."""
    ours = {k: v[1:] for k, v in layer_shapes(cfg).items()}
    return {"norm": ours["norm"], "in_proj": (cfg.d_in_proj, cfg.d_model), "conv_weight": (cfg.d_conv, cfg.conv_dim),
            "conv_bias": (cfg.conv_dim,), "dt_bias": ours["dt_bias"], "A_log": ours["A_log"], "D": ours["D"],
            "gate_norm": ours["gate_norm"], "out_proj": ours["out_proj"]}


def _bc_group_major(bc, g: int, n: int):
    """[..., B (g, n) | C (g, n)] channels -> [..., (g, B|C, n)] (numpy or jax)."""
    lead = bc.shape[:-1]
    return bc.reshape(*lead, 2, g, n).swapaxes(-3, -2).reshape(*lead, 2 * g * n)


def _bc_concatenated(bc, g: int, n: int):
    """The inverse of :func:`_bc_group_major`."""
    lead = bc.shape[:-1]
    return bc.reshape(*lead, g, 2, n).swapaxes(-3, -2).reshape(*lead, 2 * g * n)


def split_published(cfg, field: str, arr) -> dict:
    """One layer's published tensor ``field`` (numpy or jax; per-layer shape, conv_weight as (K, conv_dim))
    -> the fields of ours it holds, by pure re-arrangement (no arithmetic)."""
    h, p, g, n, e = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_inner
    concat = np.concatenate if isinstance(arr, np.ndarray) else jnp.concatenate
    if field == "in_proj":  # rows [z | x | B | C | dt]
        d = arr.shape[-1]
        z, x, b, c, dt = (arr[:e], arr[e:2 * e], arr[2 * e:2 * e + g * n], arr[2 * e + g * n:2 * e + 2 * g * n],
                          arr[2 * e + 2 * g * n:])
        return {"in_proj_heads": concat([z.reshape(h, p, d), x.reshape(h, p, d)], axis=1), "in_proj_dt": dt,
                "in_proj_groups": concat([b.reshape(g, n, d), c.reshape(g, n, d)], axis=1)}
    if field in ("conv_weight", "conv_bias"):  # channels [x | B | C] on the last axis
        part = field.removeprefix("conv_")
        return {f"conv_x_{part}": arr[..., :e], f"conv_bc_{part}": _bc_group_major(arr[..., e:], g, n)}
    return {field: arr}


def join_published(cfg, field: str, lp: Mamba2LayerParams):
    """The inverse of :func:`split_published`: one layer's (per-layer) published tensor ``field``."""
    h, p, g, n = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
    if field == "in_proj":
        heads, groups = lp.in_proj_heads, lp.in_proj_groups
        d = heads.shape[-1]
        concat = np.concatenate if isinstance(heads, np.ndarray) else jnp.concatenate
        return concat([heads[:, :p].reshape(h * p, d), heads[:, p:2 * p].reshape(h * p, d),
                       groups[:, :n].reshape(g * n, d), groups[:, n:].reshape(g * n, d), lp.in_proj_dt], axis=0)
    if field in ("conv_weight", "conv_bias"):
        part = field.removeprefix("conv_")
        x, bc = getattr(lp, f"conv_x_{part}"), getattr(lp, f"conv_bc_{part}")
        concat = np.concatenate if isinstance(x, np.ndarray) else jnp.concatenate
        return concat([x, _bc_concatenated(bc, g, n)], axis=-1)
    return getattr(lp, field)


def from_checkpoint_layout(cfg, published: dict) -> dict:
    """One layer's arrays in the published layout (every field of :data:`CHECKPOINT_FIELDS`) -> the fields
    of :class:`Mamba2LayerParams`."""
    out = {}
    for field in CHECKPOINT_FIELDS:
        out.update(split_published(cfg, field, published[field]))
    return out


def to_checkpoint_layout(cfg, lp: Mamba2LayerParams) -> dict:
    """The inverse of :func:`from_checkpoint_layout` (one layer, per-layer shapes)."""
    return {field: join_published(cfg, field, lp) for field in CHECKPOINT_FIELDS}


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
        published = dict(  # drawn in the published layout (the same values as before the re-layout)
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
        return Mamba2LayerParams(**from_checkpoint_layout(cfg, published))

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
    """The same weights with ``layers`` as a tuple of per-layer params (see ``ssdkit.core.layers``).

    The default layout (``init_params``, ``load_checkpoint``): decode reads each layer's weights in place
    instead of slicing (and, on CPU, copying) them out of the stacked arrays every step. A no-op for
    per-layer params; for stacked ones it costs one copy of the layer weights (drop the stacked params).
    """
    return dataclasses.replace(params, layers=unstack(params.layers))


def stack_layers(params: Mamba2Params) -> Mamba2Params:
    """The stacked layout (layers on a leading axis; one ``lax.scan`` over layers): a no-op if stacked."""
    return dataclasses.replace(params, layers=stack(params.layers))

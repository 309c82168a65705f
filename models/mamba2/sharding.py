"""Mamba-2 on a device mesh (``ssdkit.sharding``): the ``PartitionSpec`` of every parameter, cache and
batch array, and helpers that place a model, a cache, a batch or a train state on a mesh.

=======================================  ==================  ========================  =====================
array (per-layer shape; stacked: L,)      ``model`` (heads)   ``fsdp``                  ``data`` / ``seq``
=======================================  ==================  ========================  =====================
embedding, lm_head (V_pad, D)             replicated          largest divisible axis    replicated
layers.in_proj_heads (H, 2P, D)           H                   largest other axis        replicated
layers.in_proj_dt (H, D)                  H                   largest other axis        replicated
layers.in_proj_groups (G, 2N, D)          G if m divides G    largest other axis        replicated
layers.conv_x_weight (K, H·P), bias       H·P                 H·P if not on model       replicated
layers.conv_bc_weight (K, G·2N), bias     G·2N if m | G       (if ≥ 16K elements)       replicated
layers.dt_bias, A_log, D (H)              H                   replicated (small)        replicated
layers.gate_norm (H·P)                    H·P                 replicated (small)        replicated
layers.out_proj (D, H·P)                  H·P                 D                         replicated
layers.norm, norm_f (D)                   replicated          replicated                replicated
cache.conv: x's (L, B, K-1, H·P)          H·P                 B (with data)             B over (data, fsdp)
cache.conv: B, C's (L, B, K-1, G·2N)      G·2N if m | G       B                         B over (data, fsdp)
cache.state (L, B, H, P, N)               H                   B                         B over (data, fsdp)
tokens, segment_ids (B, T)                replicated          B                         B; T over seq
AdamW moments                             as their parameter  as their parameter        as their parameter
=======================================  ==================  ========================  =====================

m is the ``model`` axis size; it must divide the number of heads H. "Largest divisible axis" is
:func:`ssdkit.sharding.fsdp_spec` (never the stacked layer axis nor the axis already split over ``model``).
The compiler does the rest: under ``data`` it all-reduces the gradient; under ``fsdp`` it all-gathers each
weight where a layer uses it (``ssdkit.sharding.gather_weights``, which keeps the ``model`` split) and
reduce-scatters its gradient; under ``model`` each device projects, convolves and scans its own heads and
the output projection's partial sums are all-reduced (once per layer, B·T·D floats), as is the gated
RMSNorm's sum of squares when a group spans devices (B·T per group).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ssdkit import RecurrentCache
from ssdkit.core.layers import is_per_layer
from ssdkit.models.mamba2.config import Mamba2Config
from ssdkit.models.mamba2.params import Mamba2LayerParams, Mamba2Params, layer_shapes
from ssdkit.sharding import batch_spec, fsdp_spec, optimizer_specs, place, sequence_spec

#: the axis of each per-layer field split over ``model``: "heads" fields by head, "groups" ones by group
#: (only when the groups divide), None replicated
_MODEL_AXIS = {"norm": None, "in_proj_heads": (0, "heads"), "in_proj_dt": (0, "heads"), "in_proj_groups": (0, "groups"),
               "conv_x_weight": (1, "heads"), "conv_x_bias": (0, "heads"), "conv_bc_weight": (1, "groups"),
               "conv_bc_bias": (0, "groups"), "dt_bias": (0, "heads"), "A_log": (0, "heads"), "D": (0, "heads"),
               "gate_norm": (0, "heads"), "out_proj": (1, "heads")}


def _model_size(mesh) -> int:
    return dict(mesh.shape).get("model", 1)


def _model_axis(ngroups: int, field: str, m: int) -> int | None:
    """The per-layer axis of ``field`` split over a ``model`` axis of ``m`` devices, or None."""
    rule = _MODEL_AXIS[field]
    if m == 1 or rule is None or (rule[1] == "groups" and ngroups % m):
        return None
    return rule[0]


def _layer_specs(shapes: dict[str, tuple[int, ...]], ngroups: int, mesh, lead: int, fsdp: bool) -> Mamba2LayerParams:
    """Each field's spec from its shape (``lead`` leading layer axes): split over ``model`` by the table,
    and (``fsdp``) over ``fsdp`` on its largest other divisible axis."""
    m = _model_size(mesh)

    def spec(field):
        axis = _model_axis(ngroups, field, m)
        taken = () if axis is None else (lead + axis,)
        parts = list(fsdp_spec(shapes[field], mesh, leading=lead, exclude=taken)) if fsdp else \
            [None] * len(shapes[field])
        if axis is not None:
            parts[lead + axis] = "model"
        return P(*parts)

    return Mamba2LayerParams(**{f: spec(f) for f in _MODEL_AXIS})


def layer_model_specs(cfg: Mamba2Config, mesh, *, stacked: bool) -> Mamba2LayerParams:
    """Specs of one layer's (or the stacked layers') fields with only their ``model`` split: what FSDP's
    gather leaves of them (``ssdkit.sharding.gather_weights``)."""
    shapes = {k: v if stacked else v[1:] for k, v in layer_shapes(cfg).items()}
    return _layer_specs(shapes, cfg.ngroups, mesh, 1 if stacked else 0, fsdp=False)


def param_specs(params: Mamba2Params, mesh: Mesh) -> Mamba2Params:
    """A :class:`Mamba2Params` of ``PartitionSpec`` s for ``params`` (either layer layout) on ``mesh``."""
    stacked = not is_per_layer(params.layers)
    lead = 1 if stacked else 0
    ngroups = (params.layers if stacked else params.layers[0]).in_proj_groups.shape[lead]

    def layer_specs(lp: Mamba2LayerParams) -> Mamba2LayerParams:
        return _layer_specs({f: getattr(lp, f).shape for f in _MODEL_AXIS}, ngroups, mesh, lead, fsdp=True)

    layers = layer_specs(params.layers) if stacked else tuple(layer_specs(lp) for lp in params.layers)
    return Mamba2Params(
        embedding=fsdp_spec(params.embedding.shape, mesh),
        layers=layers,
        norm_f=P(),
        lm_head=None if params.lm_head is None else fsdp_spec(params.lm_head.shape, mesh),
    )


def cache_specs(cache: RecurrentCache, mesh: Mesh, cfg: Mamba2Config) -> RecurrentCache:
    """Specs for a (stacked) cache: rows (axis 1) over ``(data, fsdp)``, x's window and the state by head
    over ``model``, B and C's window by group when the groups divide."""
    m = _model_size(mesh)
    rows = batch_spec(1)[0]
    head = "model" if m > 1 else None
    group = "model" if m > 1 and cfg.ngroups % m == 0 else None
    return RecurrentCache(conv=(P(None, rows, None, head), P(None, rows, None, group)),
                          state=P(None, rows, head, None, None))


def shard_params(params: Mamba2Params, mesh: Mesh) -> Mamba2Params:
    """``params`` placed on ``mesh`` (a loaded checkpoint or an initialised model)."""
    return place(params, mesh, param_specs(params, mesh))


def shard_batch(arrays, mesh: Mesh):
    """Batch arrays split by rows over ``(data, fsdp)``: (batch,) arrays (lengths) by rows only, (batch, seq)
    arrays (tokens, segment ids, loss masks) also by positions over ``seq`` when the length divides."""
    def spec(a):
        return batch_spec(1) if a.ndim == 1 else sequence_spec(a.ndim, a.shape[1], mesh)

    return place(arrays, mesh, jax.tree_util.tree_map(spec, arrays))


def train_state_specs(state, optimizer, mesh: Mesh):
    """Specs for an ``ssdkit.TrainState`` of Mamba-2: parameters and their optimiser moments by
    :func:`param_specs`, counters replicated."""
    specs = param_specs(state.params, mesh)
    return type(state)(step=P(), params=specs, opt_state=optimizer_specs(optimizer, state.opt_state, specs),
                       skipped=P())


def config_check(cfg: Mamba2Config, mesh: Mesh) -> None:
    """Raise unless ``cfg`` can use ``mesh``: the ``model`` axis must divide the heads."""
    m = _model_size(mesh)
    if cfg.nheads % m:
        raise ValueError(f"the mesh's 'model' axis of {m} devices does not divide the model's {cfg.nheads} heads "
                         f"(tensor parallelism splits by head); use a 'model' size that divides {cfg.nheads}")

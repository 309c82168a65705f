"""Mamba-2 on a device mesh (``ssdkit.sharding``): the ``PartitionSpec`` of every parameter, cache and
batch array, and helpers that place a model, a cache, a batch or a train state on a mesh.

====================================  ===============================  ==================================
array (per-layer shape; stacked: L,)  data parallel (``data``)         fully sharded (``fsdp``)
====================================  ===============================  ==================================
embedding, lm_head (V_pad, D)         replicated                       largest divisible axis over fsdp
layers.in_proj (d_in_proj, D)         replicated                       largest divisible axis over fsdp
layers.out_proj (D, d_inner)          replicated                       largest divisible axis over fsdp
layers.conv_weight (K, conv_dim)      replicated                       conv_dim over fsdp (if ≥ 16K elems)
norms, conv_bias, dt_bias, A_log, D   replicated                       replicated (small)
cache.conv (L, B, K-1, conv_dim)      B over (data, fsdp)              B over (data, fsdp)
cache.state (L, B, H, P, N)           B over (data, fsdp)              B over (data, fsdp)
tokens, segment_ids (B, T)            B over (data, fsdp)              B over (data, fsdp)
AdamW moments                         as their parameter               as their parameter
====================================  ===============================  ==================================

"Largest divisible axis" is :func:`ssdkit.sharding.fsdp_spec` (never the stacked layer axis, so the layer
scan gathers one layer's weight at a time). Everything else follows from the compiler: under ``data`` it
all-reduces the gradient, under ``fsdp`` it all-gathers each weight where a layer uses it and
reduce-scatters its gradient.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.mamba2.config import Mamba2Config
from models.mamba2.params import Mamba2Params
from ssdkit import RecurrentCache
from ssdkit.sharding import batch_spec, fsdp_spec, optimizer_specs, place, sequence_spec
from ssdkit.stack import is_per_layer


def param_specs(params: Mamba2Params, mesh: Mesh) -> Mamba2Params:
    """A :class:`Mamba2Params` of ``PartitionSpec`` s for ``params`` (either layer layout) on ``mesh``."""
    stacked = not is_per_layer(params.layers)
    layers = jax.tree_util.tree_map(lambda a: fsdp_spec(a.shape, mesh, leading=1 if stacked else 0), params.layers)
    return Mamba2Params(
        embedding=fsdp_spec(params.embedding.shape, mesh),
        layers=layers,
        norm_f=P(),
        lm_head=None if params.lm_head is None else fsdp_spec(params.lm_head.shape, mesh),
    )


def cache_specs(cache: RecurrentCache) -> RecurrentCache:
    """Specs for a (stacked) cache: the batch axis (axis 1) over ``(data, fsdp)``."""
    return RecurrentCache(conv=P(None, *batch_spec(cache.conv.ndim - 1)),
                          state=P(None, *batch_spec(cache.state.ndim - 1)))


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
    """Raise unless ``cfg`` can use ``mesh`` (the axes this model does not split must have size 1)."""
    if mesh.shape["model"] != 1:
        raise ValueError(f"the 'model' axis is not supported for Mamba-2 yet (mesh {dict(mesh.shape)})")

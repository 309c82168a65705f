"""Running a stack of identical layers.

Layer weights come in one of two layouts, and the cache is always stacked (layer axis first):

* **stacked** — one PyTree whose leaves carry the layer axis first: the stack runs as one ``lax.scan``
  (compile time independent of depth). Inside a compiled program each layer's weights are then a
  (dynamic) slice of the stacked arrays, which XLA's CPU backend copies every call: fine for prefill,
  where the copies are small next to the work, but it doubles the memory traffic of single-token decode.
  Small per-layer arrays (norm scales, conv taps, biases: at most :data:`SMALL_LEAF` elements a layer)
  are not sliced at all: they ride in the loop carry and are rotated by one layer each iteration, so a
  layer reads them at the static index 0. An elementwise fusion that reads a dynamic slice runs about
  6x slower on XLA's CPU backend (measured: a conv + SiLU over 2048 x 1792, 16 -> 2.5 ms a layer).
* **per layer** — a tuple of per-layer PyTrees (see :func:`unstack`): the stack is unrolled and every
  layer reads its weights in place. The fast layout for memory-bound decode (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from ssdkit.dtypes import HALF_PRODUCT

C = TypeVar("C")

#: Per-layer leaves with at most this many elements are rotated through the ``lax.scan`` carry instead of
#: being sliced with a dynamic layer index (see the module docstring).
SMALL_LEAF = 1 << 16

#: Rematerialisation of each layer in the backward pass (``jax.checkpoint`` policies), by name:
#: ``"none"`` keeps every activation; ``"layer"`` keeps only each layer's input and recomputes the layer
#: (least memory, about one more forward); ``"matmuls"`` keeps the matrix products' outputs and recomputes
#: the elementwise work and the scan around them (half-precision products of ``ssdkit.dtypes.sequence_einsum``
#: too: a custom VJP hides their dot from the dots policy, so they are saved by name).
REMAT_POLICIES = {
    "none": None,
    "layer": jax.checkpoint_policies.nothing_saveable,
    "matmuls": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(HALF_PRODUCT)),
}


def remat_layer(layer_fn: Callable, remat: str) -> Callable:
    """``layer_fn`` wrapped in ``jax.checkpoint`` with the named policy (:data:`REMAT_POLICIES`)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {', '.join(map(repr, REMAT_POLICIES))}, got {remat!r}")
    policy = REMAT_POLICIES[remat]
    return layer_fn if policy is None else jax.checkpoint(layer_fn, policy=policy)


def is_per_layer(layers: Any) -> bool:
    """True for the per-layer layout (a tuple or list of per-layer PyTrees)."""
    return isinstance(layers, tuple | list)


def unstack(layers: Any) -> tuple[Any, ...]:
    """Stacked layout -> per-layer layout (one copy of the weights; drop the stacked one afterwards)."""
    if is_per_layer(layers):
        return tuple(layers)
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(n))


def stack(layers: Any) -> Any:
    """Per-layer layout -> stacked layout (a no-op for stacked layers)."""
    if not is_per_layer(layers):
        return layers
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)


def scan_layers(
    layer_fn: Callable[[Any, jax.Array, C], tuple[jax.Array, C]],
    layers: Any,
    residual: jax.Array,
    cache: C,
    *,
    remat: str = "none",
) -> tuple[jax.Array, C]:
    """Run ``layer_fn(layer_params, residual, layer_cache) -> (residual, layer_cache)`` over the layers.

    ``remat`` names what the backward pass keeps of each layer (:data:`REMAT_POLICIES`).

    ``layers`` and ``cache`` each come stacked (a PyTree with the layer axis first) or per layer (a
    tuple); the cache is returned in the layout it came in. Stacked weights run as one ``lax.scan``
    (small per-layer arrays rotate through its carry, large ones are sliced per iteration).
    Per-layer weights run unrolled; with a per-layer cache too nothing is sliced or copied, which is
    what a decode loop wants (a stacked cache is split before and restacked after, two copies).
    """
    layer_fn = remat_layer(layer_fn, remat)
    if not is_per_layer(layers):
        leaves, treedef = jax.tree_util.tree_flatten(layers)
        small = [leaf.size <= SMALL_LEAF * leaf.shape[0] for leaf in leaves]

        def body(carry, xs):
            res, rotating = carry
            big, layer_cache = xs
            it_small, it_big = iter(rotating), iter(big)
            lp = treedef.unflatten([next(it_small)[0] if s else next(it_big) for s in small])
            res, layer_cache = layer_fn(lp, res, layer_cache)
            # Layer i + 1's small arrays move to index 0 for the next iteration.
            return (res, [jnp.roll(a, -1, axis=0) for a in rotating]), layer_cache

        rotating = [leaf for leaf, s in zip(leaves, small, strict=True) if s]
        big = [leaf for leaf, s in zip(leaves, small, strict=True) if not s]
        (residual, _), new = lax.scan(body, (residual, rotating), (big, stack(cache)))
        return residual, (unstack(new) if is_per_layer(cache) else new)

    caches = unstack(cache)
    out = []
    for lp, layer_cache in zip(layers, caches, strict=True):
        residual, layer_cache = layer_fn(lp, residual, layer_cache)
        out.append(layer_cache)
    return residual, (tuple(out) if is_per_layer(cache) else stack(out))

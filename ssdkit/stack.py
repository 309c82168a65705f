"""Running a stack of identical layers.

Layer weights come in one of two layouts, and the cache is always stacked (layer axis first):

* **stacked** — one PyTree whose leaves carry the layer axis first: the stack runs as one ``lax.scan``
  (compile time independent of depth). Inside a compiled program each layer's weights are then a
  (dynamic) slice of the stacked arrays, which XLA's CPU backend copies every call: fine for prefill,
  where the copies are small next to the work, but it doubles the memory traffic of single-token decode.
* **per layer** — a tuple of per-layer PyTrees (see :func:`unstack`): the stack is unrolled and every
  layer reads its weights in place. The fast layout for memory-bound decode (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

C = TypeVar("C")


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
) -> tuple[jax.Array, C]:
    """Run ``layer_fn(layer_params, residual, layer_cache) -> (residual, layer_cache)`` over the layers.

    ``layers`` and ``cache`` each come stacked (a PyTree with the layer axis first) or per layer (a
    tuple); the cache is returned in the layout it came in. Stacked weights run as one ``lax.scan``.
    Per-layer weights run unrolled; with a per-layer cache too nothing is sliced or copied, which is
    what a decode loop wants (a stacked cache is split before and restacked after, two copies).
    """
    if not is_per_layer(layers):
        def body(res, xs):
            lp, layer_cache = xs
            return layer_fn(lp, res, layer_cache)

        residual, new = lax.scan(body, residual, (layers, stack(cache)))
        return residual, (unstack(new) if is_per_layer(cache) else new)

    caches = unstack(cache)
    out = []
    for lp, layer_cache in zip(layers, caches, strict=True):
        residual, layer_cache = layer_fn(lp, residual, layer_cache)
        out.append(layer_cache)
    return residual, (tuple(out) if is_per_layer(cache) else stack(out))

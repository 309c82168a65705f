"""Running a stack of identical layers whose weights and caches are stacked on a leading axis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax import lax

C = TypeVar("C")


def scan_layers(
    layer_fn: Callable[[Any, jax.Array, C], tuple[jax.Array, C]],
    layers: Any,
    residual: jax.Array,
    cache: C,
) -> tuple[jax.Array, C]:
    """``lax.scan`` of ``layer_fn(layer_params, residual, layer_cache) -> (residual, layer_cache)``.

    ``layers`` and ``cache`` are PyTrees whose leaves carry the layer axis first; the returned cache is
    stacked the same way. Compile time does not grow with depth.
    """

    def body(res, xs):
        lp, layer_cache = xs
        return layer_fn(lp, res, layer_cache)

    return lax.scan(body, residual, (layers, cache))

"""The recurrent cache: a registered PyTree of conv windows and recurrent states.

    conv:  (..., batch, K-1, chan)   the last K-1 conv inputs, oldest first, in the compute dtype
    state: (..., batch, H, P, N)     the recurrent state, float32 whatever the compute dtype

The optional leading ``...`` is a layer axis: a model stacks one cache per layer and ``lax.scan``s over
layers with the cache as ``xs``, getting one unstacked ``RecurrentCache`` per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ssdkit.recurrence import Recurrence


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """Conv window and recurrent state of one layer, or of a stack of layers (leading axis)."""

    conv: jax.Array
    state: jax.Array

    @classmethod
    def zeros(
        cls,
        spec: Recurrence,
        *,
        batch: int,
        kernel_size: int,
        conv_channels: int,
        num_layers: int | None = None,
        conv_dtype=jnp.float32,
        state_dtype=jnp.float32,
    ) -> RecurrentCache:
        """An empty cache: zero window (batch, kernel_size-1, conv_channels) and zero state
        (batch, H, P, N), with a leading (num_layers,) axis when ``num_layers`` is given."""
        if jnp.dtype(state_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise TypeError(f"the recurrent state must be float32 (or float64), got {jnp.dtype(state_dtype)}")
        for name, v in (("batch", batch), ("kernel_size", kernel_size), ("conv_channels", conv_channels)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"num_layers must be a positive integer or None, got {num_layers!r}")
        lead = () if num_layers is None else (num_layers,)
        return cls(
            conv=jnp.zeros((*lead, batch, kernel_size - 1, conv_channels), conv_dtype),
            state=jnp.zeros((*lead, *spec.state_shape(batch)), state_dtype),
        )

    @property
    def num_layers(self) -> int | None:
        """Size of the leading layer axis, or None for a single layer's cache."""
        return self.state.shape[0] if self.state.ndim == 5 else None

    @property
    def batch_size(self) -> int:
        return self.state.shape[-4]

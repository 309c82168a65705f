"""The recurrent cache: a registered PyTree of conv windows and recurrent states.

Layout (the optional leading ``layers`` axis is present for a stacked, whole-model cache)::

    conv:  ([layers,] batch, K-1, chan)   the last K-1 conv inputs, oldest first, in the compute dtype
                                          (or a tuple of such windows, one per channel set)
    state: ([layers,] batch, H, P, N)     the recurrent state, float32 whatever the compute dtype

The state stays float32 (float64 in oracle tests) even when activations are bfloat16 or float16: it is
updated by a long product of decays, and a half-precision state loses the recurrence within a few dozen
steps. The conv window holds raw inputs and is only ever summed K terms at a time, so it lives in the
compute dtype, as :func:`ssdkit.causal_conv1d` returns it.

``RecurrentCache`` is a frozen dataclass registered with ``jax.tree_util.register_dataclass``: both
fields are PyTree leaves, so a cache passes through ``jit`` (and can be donated), ``tree_map`` and
``vmap``. A model stacks one cache per layer and ``lax.scan``s over layers with the cache as ``xs``;
each iteration receives one unstacked ``RecurrentCache`` (conv (batch, K-1, chan), state (batch, H, P, N))
and returns the updated one, which ``scan`` re-stacks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit.core.recurrence import Recurrence
from ssdkit.dtypes import FLOAT_DTYPES

_STATE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """Conv window and recurrent state of one layer, or of a stack of layers (leading axis).

    Attributes:
        conv: ([layers,] batch, K-1, chan) carried conv window, oldest input first, compute dtype; or a
            tuple of such windows (one per separately convolved channel set).
        state: ([layers,] batch, H, P, N) recurrent state, float32 (float64 allowed).

    Build an empty one with :meth:`zeros`. The fields are not validated on construction (JAX rebuilds
    the dataclass from tracers and placeholders); :meth:`zeros` checks its arguments.
    """

    conv: jax.Array | tuple[jax.Array, ...]
    state: jax.Array

    @classmethod
    def zeros(
        cls,
        spec: Recurrence,
        *,
        batch: int,
        kernel_size: int,
        conv_channels: int | tuple[int, ...],
        num_layers: int | None = None,
        conv_dtype=jnp.float32,
        state_dtype=jnp.float32,
    ) -> RecurrentCache:
        """An empty cache.

        Args:
            spec: the recurrence, giving the state's (H, P, N).
            batch: number of rows.
            kernel_size: K, the conv kernel size (>= 1; K = 1 gives a zero-length window).
            conv_channels: channels of the conv, or a tuple of channel counts for a model that convolves
                several channel sets separately (Mamba-2: (H·P, 2·G·N), so that x's channels split by
                head over a mesh while B and C's split by group); ``conv`` is then a tuple of windows
                (the empty tuple for a layer without a conv).
            num_layers: None for one layer's cache, or the size of a leading layer axis.
            conv_dtype: dtype of the conv window (the compute dtype), any float dtype.
            state_dtype: float32 (default) or float64; half precision is rejected.

        Returns:
            conv zeros ([num_layers,] batch, kernel_size-1, conv_channels) in ``conv_dtype`` and state
            zeros ([num_layers,] batch, H, P, N) in ``state_dtype``.
        """
        if not isinstance(spec, Recurrence):
            raise TypeError(f"spec must be an ssdkit.Recurrence (for the state's H, P, N), got {type(spec).__name__}")
        if jnp.dtype(state_dtype) not in _STATE_DTYPES:
            raise TypeError(
                f"the recurrent state must be float32 (or float64), got {jnp.dtype(state_dtype)}: a half-"
                f"precision state loses the recurrence within a few dozen steps; keep state_dtype=float32 "
                f"and use conv_dtype for the compute dtype"
            )
        if not any(jnp.dtype(conv_dtype) == jnp.dtype(d) for d in FLOAT_DTYPES):
            raise TypeError(
                f"conv_dtype must be a floating dtype (float16, bfloat16, float32 or float64), got "
                f"{jnp.dtype(conv_dtype)}"
            )
        several = isinstance(conv_channels, tuple)
        channels = conv_channels if several else (conv_channels,)
        for name, v in (("batch", batch), ("kernel_size", kernel_size), *(("conv_channels", c) for c in channels)):
            _positive_int(name, v)
        if num_layers is not None:
            _positive_int("num_layers", num_layers)
        lead = () if num_layers is None else (int(num_layers),)
        windows = tuple(jnp.zeros((*lead, int(batch), int(kernel_size) - 1, int(c)), conv_dtype) for c in channels)
        return cls(conv=windows if several else windows[0],
                   state=jnp.zeros((*lead, *spec.state_shape(int(batch))), state_dtype))

    @property
    def num_layers(self) -> int | None:
        """Size of the leading layer axis, or None for a single layer's cache."""
        return self.state.shape[0] if self.state.ndim == 5 else None

    @property
    def batch_size(self) -> int:
        """Number of batch rows."""
        return self.state.shape[-4]

"""The dtype policy.

Inputs and weights may be float32, bfloat16 or float16 (or float64 for oracle tests). Decays,
recurrent states and every accumulation are done in the *accumulation dtype*: float32, or float64 when
an input is float64. Outputs come back in the compute dtype of the values (``x``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: Floating dtypes accepted for inputs and weights.
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 if any of ``dtypes`` is float64."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def _dtype_of(arr) -> jnp.dtype:
    return jnp.dtype(arr.dtype if hasattr(arr, "dtype") else np.asarray(arr).dtype)


def check_floating(name: str, arr) -> None:
    """Raise ``TypeError`` unless ``arr`` has one of the accepted floating dtypes."""
    dtype = _dtype_of(arr)
    if not any(dtype == jnp.dtype(d) for d in FLOAT_DTYPES):
        raise TypeError(
            f"{name} must be a floating array (float16, bfloat16, float32 or float64), got dtype "
            f"{dtype}. Cast it first, e.g. {name}.astype(jnp.float32)."
        )


def check_integer(name: str, arr) -> None:
    """Raise ``TypeError`` unless ``arr`` has an integer dtype."""
    dtype = _dtype_of(arr)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {dtype}.")


def is_concrete(arr) -> bool:
    """True when ``arr`` holds concrete values (not a tracer inside jit/grad/vmap)."""
    return not isinstance(arr, jax.core.Tracer)


def check_lengths(name: str, lengths, batch: int, seq: int) -> None:
    """Raise unless ``lengths`` is a (batch,) integer array with values in 1..seq (when concrete)."""
    check_integer(name, lengths)
    if np.shape(lengths) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {np.shape(lengths)}")
    if is_concrete(lengths):
        lv = np.asarray(lengths)
        if lv.min() < 1 or lv.max() > seq:
            raise ValueError(f"{name} must lie in 1..{seq} (the padded prompt length), got {lv.tolist()}")

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


#: Backends whose half-precision matrix products over many tokens ran slower than float32 ones.
_SLOW_HALF_MATMUL = ("cpu",)


def sequence_matmul_dtype(weight_dtype, backend: str | None = None) -> jnp.dtype:
    """The dtype in which to multiply a whole sequence of activations by ``weight_dtype`` weights.

    On XLA's CPU backend bfloat16 and float16 products ran slower than float32 ones (Mamba-2 130M
    prefill of 2,048 tokens, bfloat16 weights: 439 tokens/s against 581 in float32), so there half-precision
    weights are upcast to float32 for the product: one extra pass over the weights, small next to a
    prefill's matrix products, and the product is only more exact. Single-token decode does not use this
    (the upcast would triple its weight traffic). Other backends and dtypes: ``weight_dtype`` itself.
    """
    dtype = jnp.dtype(weight_dtype)
    half = dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if half and (backend or jax.default_backend()) in _SLOW_HALF_MATMUL:
        return jnp.dtype(jnp.float32)
    return dtype


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


def readable(arr) -> np.ndarray:
    """The values of a concrete ``arr`` that this process can read, flattened: all of them, or, for an
    array spread over several processes (``jax.distributed``), those on this process's devices — every
    process checks its own part."""
    if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
        parts = [np.ravel(np.asarray(s.data)) for s in arr.addressable_shards]
        return np.concatenate(parts) if parts else np.zeros(0, arr.dtype)
    return np.asarray(arr)


def check_lengths(name: str, lengths, batch: int, seq: int, *, low: int = 1,
                  meaning: str = "the padded prompt length") -> None:
    """Raise unless ``lengths`` is a (batch,) integer array with values in low..seq (when concrete);
    ``meaning`` says what ``seq`` is, in the message."""
    check_integer(name, lengths)
    if np.shape(lengths) != (batch,):
        raise ValueError(f"{name} must have shape (batch,) = ({batch},), got {np.shape(lengths)}")
    if is_concrete(lengths):
        lv = readable(lengths)
        if lv.size and (lv.min() < low or lv.max() > seq):
            raise ValueError(f"{name} must lie in {low}..{seq} ({meaning}), got {lv.tolist()}")

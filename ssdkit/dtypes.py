"""The dtype policy.

Inputs and weights may be float32, bfloat16 or float16 (or float64 for oracle tests). Decays,
recurrent states and every accumulation are done in the *accumulation dtype*: float32, or float64 when
an input is float64. Outputs come back in the compute dtype of the values (``x``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float

from ssdkit.matmul_probe import HalfMatmul, half_products

#: Floating dtypes accepted for inputs and weights.
FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def accumulation_dtype(*dtypes) -> jnp.dtype:
    """float32, or float64 if any of ``dtypes`` is float64."""
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def sequence_matmul_dtype(weight_dtype, backend: str | None = None) -> jnp.dtype:
    """The dtype in which to multiply a whole sequence of activations by ``weight_dtype`` weights.

    Rule: float32 and float64 weights multiply in their own dtype. Half-precision (bfloat16, float16)
    weights multiply in their own dtype where that is faster, and are upcast to float32 for the product
    where it is not (one extra pass over the weights, and a more exact product); either way the product
    accumulates in float32 (callers pass ``preferred_element_type``). Where is it faster
    (``ssdkit.matmul_probe.half_products``): on GPU and TPU always; on XLA's CPU backend it depends on the
    CPU (an AMD EPYC with AVX-512-BF16, Zen 4: bfloat16 GEMM 327 GFLOP/s against float32's 160; an Intel
    Xeon with avx512_bf16: 118 against 218; an AVX2-only EPYC, Zen 3: 41 against 72), so a short probe
    (under a second, once per machine kind) times both and its answer is cached per CPU model and flags,
    jax version and ``XLA_FLAGS`` in ``~/.cache/ssdkit/`` (or ``$XDG_CACHE_HOME/ssdkit/``). Only
    bfloat16 is probed: float16 weights are upcast on CPU. The environment variable
    ``SSDKIT_HALF_MATMUL`` = ``auto`` (default) | ``bfloat16`` | ``float32`` overrides the rule on every
    backend (``bfloat16``: half-precision weights always multiply in their own
    dtype; ``float32``: always upcast). Single-token decode does not use this (an upcast would triple its
    weight traffic). ``backend``: default JAX's.
    """
    dtype = jnp.dtype(weight_dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return dtype
    if dtype == jnp.dtype(jnp.float16) and HalfMatmul.from_env() is HalfMatmul.AUTO:  # not probed
        half = (backend or jax.default_backend()) != "cpu"
    else:
        half = half_products(backend)
    return dtype if half else jnp.dtype(jnp.float32)


#: The name (``jax.ad_checkpoint.checkpoint_name``) of :func:`sequence_einsum`'s half-precision products, which
#: ``remat="matmuls"`` saves (``ssdkit.core.layers.REMAT_POLICIES``) as it saves plain products.
HALF_PRODUCT = "ssdkit_half_product"


def sequence_einsum(spec: str, x: Float[Array, "*x"], w: Float[Array, "*w"]) -> Float[Array, "*y"]:
    """``einsum(spec, x, w)`` of a whole sequence ``x`` by weights ``w``, in :func:`sequence_matmul_dtype` of
    ``w.dtype``, accumulated in float32 (a float32 result, as ``preferred_element_type`` gives it).

    ``spec`` has two operands and an explicit output (``"...d,ed->...e"``). A half-precision product keeps
    its gradient's two products in half precision too (a custom VJP: the incoming float32 cotangent is
    rounded to the product's dtype, and each product accumulates in float32), where JAX's own rule would
    multiply the float32 cotangent by the upcast operand, in float32. Float32 products are plain einsums.
    """
    dtype = sequence_matmul_dtype(w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return checkpoint_name(_half_einsum(spec, x, w), HALF_PRODUCT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _half_einsum(spec, x, w):
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _half_einsum_fwd(spec, x, w):
    return _half_einsum(spec, x, w), (x, w)


def _half_einsum_bwd(spec, res, g):
    x, w = res
    operands, out = spec.replace(" ", "").split("->")
    lhs, rhs = operands.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{rhs}->{lhs}", g, w, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.einsum(f"{out},{lhs}->{rhs}", g, x, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_half_einsum.defvjp(_half_einsum_fwd, _half_einsum_bwd)


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

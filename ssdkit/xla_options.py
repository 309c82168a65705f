"""XLA compiler options for the programs ssdkit compiles, per backend, each with its measured reason.

Training on XLA's CPU backend. jaxlib 0.10 hands matrix products, elementwise fusions and reductions to
YNNPACK by default. Its reductions are slow for the column sums of a backward pass (the gradients of norm
scales, conv taps and biases: a sum over every token of a (tokens, channels) array) and for the
per-token norms: Mamba-2 130M widths, 2,048 tokens, one layer's training step took 1.0 s with them and
0.74 s with YNNPACK kept to matrix products (4 layers, a 256-token vocabulary: 3.98 s against 2.95 s).
Prefill and decode do not gain (130M prefill of 2,048 tokens: 562 against 516 tokens/s, within noise), so
only the training step asks for it.

Inference on XLA's CPU backend. XLA generates its own code for matrix-vector products and elementwise
fusions, with 256-bit vectors by default even where the CPU has 512-bit ones. On a 2-core AMD EPYC with
AVX-512, 512-bit vectors made the 130M float32 decode step 5–9% faster at batch 1 (three alternating
runs: 16.83 → 15.41, 16.30 → 15.32, 15.06 → 14.30 ms), 3% at batch 16 and prefill of 512 tokens 6%
(971 → 1,030 tokens/s); the training step did not gain (1.28 against 1.32 s, 6 layers at 512 tokens),
so it keeps the default. A CPU without AVX-512 (or ``--xla_cpu_max_isa=AVX2``) is unaffected.

A user's own ``XLA_FLAGS`` setting of an option wins, and a jaxlib that does not know an option gets none.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

#: Options for a compiled training step on the CPU backend.
CPU_TRAINING = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_DOT"),)
#: Options for compiled inference programs (forward, prefill, decode, generation) on the CPU backend.
CPU_INFERENCE = (("xla_cpu_prefer_vector_width", "512"),)


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...], backend: str) -> bool:
    """Whether this jaxlib compiles a trivial program with ``options`` on ``backend``."""
    try:
        x = jax.device_put(jnp.zeros((2,), jnp.float32), jax.devices(backend)[0])  # jit follows its input
        jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(x).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option or value: compile without it
        return False


def _cpu_options(wanted: tuple[tuple[str, str], ...], backend: str | None) -> dict[str, str]:
    """``wanted`` on the CPU backend, less what the user's ``XLA_FLAGS`` sets and what this jaxlib rejects."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    user = os.environ.get("XLA_FLAGS", "")
    options = tuple((k, v) for k, v in wanted if f"--{k}" not in user)
    return dict(options) if options and _accepted(options, backend) else {}


def training_compiler_options(backend: str | None = None) -> dict[str, str]:
    """Compiler options for a training step on ``backend`` (default: JAX's default backend)."""
    return _cpu_options(CPU_TRAINING, backend)


def inference_compiler_options(backend: str | None = None) -> dict[str, str]:
    """Compiler options for an inference program on ``backend`` (default: JAX's default backend)."""
    return _cpu_options(CPU_INFERENCE, backend)


def _tracing(args: Any) -> bool:
    """Whether a call with ``args`` happens inside another function's trace (a nested jit)."""
    try:
        from jax._src.core import trace_state_clean
    except ImportError:  # a JAX without it: a traced argument tells
        return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(args))
    return not trace_state_clean()


class InferenceJit:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`inference_compiler_options`.

    The jitted function is made on first use, not at import: the options depend on the default backend,
    which must not be initialised before the user configures JAX (``jax.distributed.initialize``). Called
    inside another jit it is a plain nested jit (JAX takes compiler options only at the top level; the
    enclosing program's own apply). Every attribute of the jitted function (``lower``, ...) is forwarded.
    """

    def __init__(self, fun: Callable[..., Any], **jit_kwargs: Any):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs = fun, jit_kwargs

    @functools.cached_property
    def _jitted(self):
        return jax.jit(self._fun, compiler_options=inference_compiler_options(), **self._jit_kwargs)

    @functools.cached_property
    def _nested(self):
        return jax.jit(self._fun, **self._jit_kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        jitted = self._nested if _tracing((args, kwargs)) else self._jitted
        return jitted(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fun", "_jit_kwargs", "_jitted", "_nested"):
            raise AttributeError(name)
        return getattr(self._jitted, name)


def inference_jit(fun: Callable[..., Any] | None = None, **jit_kwargs: Any):
    """``jax.jit`` for inference programs, as a decorator (``@inference_jit`` or
    ``@functools.partial(inference_jit, static_argnames=...)``) or a call: see :class:`InferenceJit`."""
    if fun is None:
        return functools.partial(inference_jit, **jit_kwargs)
    return InferenceJit(fun, **jit_kwargs)

"""XLA compiler options for the programs ssdkit compiles, per backend, each with its measured reason.

Training on XLA's CPU backend. jaxlib 0.10 hands matrix products, elementwise fusions and reductions to
YNNPACK by default. Its reductions are slow for the column sums of a backward pass (the gradients of norm
scales, conv taps and biases: a sum over every token of a (tokens, channels) array) and for the
per-token norms: Mamba-2 130M widths, 2,048 tokens, one layer's training step took 1.0 s with them and
0.74 s with YNNPACK kept to matrix products (4 layers, a 256-token vocabulary: 3.98 s against 2.95 s).
Prefill and decode do not gain (130M prefill of 2,048 tokens: 562 against 516 tokens/s, within noise), so
only the training step asks for it. A user's own ``XLA_FLAGS`` setting of the same option wins, and a
jaxlib that does not know the option gets none.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

#: Options for a compiled training step on the CPU backend.
CPU_TRAINING = (("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_DOT"),)


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...], backend: str) -> bool:
    """Whether this jaxlib compiles a trivial program with ``options`` on ``backend``."""
    try:
        x = jax.device_put(jnp.zeros((2,), jnp.float32), jax.devices(backend)[0])  # jit follows its input
        jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(x).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option or value: compile without it
        return False


def training_compiler_options(backend: str | None = None) -> dict[str, str]:
    """Compiler options for a training step on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    if backend != "cpu":
        return {}
    user = os.environ.get("XLA_FLAGS", "")
    options = tuple((k, v) for k, v in CPU_TRAINING if f"--{k}" not in user)
    return dict(options) if options and _accepted(options, backend) else {}

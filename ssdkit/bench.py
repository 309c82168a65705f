"""Benchmark tools, model-agnostic: timing with warm-up and repeats, and the machine's own ceilings.

Figures are measured in the same run as the workloads they are compared with (shared machines are
noisy): a jitted GEMM at the dtype used gives the compute ceiling, a jitted streaming reduction the
memory-bandwidth ceiling.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call: median, min and max over ``repeats`` calls after warm-up."""

    median: float
    min: float
    max: float
    repeats: int


def time_calls(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> Timing:
    """Time ``fn()`` (which must return JAX arrays), blocking on its result each call.

    Runs ``warmup`` untimed calls, then at least ``repeats`` timed ones (more while their total is below
    ``min_time`` seconds).
    """
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def compile_seconds(jitted, *args, **kwargs) -> tuple[float, object]:
    """Wall time of ``jitted.lower(*args).compile()``; returns (seconds, compiled executable)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - t, compiled


def temp_bytes(compiled) -> int | None:
    """Peak scratch memory XLA plans for a compiled program (beyond its arguments and outputs)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """The machine's measured limits: matmul FLOP/s at a dtype and streaming read bytes/s."""

    dtype: str
    gemm_flops: float  # median
    gemm_flops_best: float
    read_bytes_per_s: float  # median
    read_bytes_per_s_best: float


def measure_ceilings(dtype=jnp.float32, *, n: int = 2048, read_mib: int = 512, repeats: int = 7) -> Ceilings:
    """A jitted (n×n)·(n×n) GEMM in ``dtype`` with float32 accumulation, and a jitted full reduction of a
    ``read_mib`` MiB float32 array (reads every byte once)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    gemm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    tg = time_calls(lambda: gemm(a, b), repeats=repeats)
    flops = 2.0 * n**3
    buf = jnp.ones((read_mib * 2**20 // 4,), jnp.float32)
    read = jax.jit(lambda x: jnp.sum(x))
    tr = time_calls(lambda: read(buf), repeats=repeats)
    nbytes = buf.size * 4
    return Ceilings(jnp.dtype(dtype).name, flops / tg.median, flops / tg.min, nbytes / tr.median, nbytes / tr.min)

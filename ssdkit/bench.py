"""Benchmark tools, model-agnostic: timing with warm-up and repeats, and the machine's own ceilings.

Figures are measured in the same run as the workloads they are compared with (shared machines are
noisy): a jitted GEMM at the dtype used gives the compute ceiling, a jitted streaming reduction the
memory-bandwidth ceiling.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


def planned_peak_bytes(compiled) -> int | None:
    """XLA's planned peak of a compiled program: arguments + outputs - donated (aliased) + scratch."""
    try:
        ma = compiled.memory_analysis()
        return int(ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
                   + ma.temp_size_in_bytes)
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


@dataclasses.dataclass(frozen=True)
class RooflinePoint:
    """One measured workload placed on the roofline.

    ``intensity`` is FLOPs per byte of compulsory memory traffic (what must cross the memory bus at
    least once: weights, cache, inputs), so the bandwidth roof at that intensity is an upper bound.
    """

    implementation: str
    workload: str
    flops_per_s: float
    intensity: float


BENCH_EXTRA_HINT = "pip install 'ssdkit[bench]', or from a clone: pip install -e '.[bench]'"  # matplotlib


def plot_roofline(ceilings: Sequence[Ceilings], points: Sequence[RooflinePoint], path: str | Path, *,
                  title: str = "") -> Path:
    """Write a log-log roofline PNG: for each measured ceiling the roof ``min(peak, bandwidth · intensity)``,
    and every point as achieved FLOP/s at its intensity, one marker colour per implementation.

    Needs matplotlib (:data:`BENCH_EXTRA_HINT`); uses its object API (no pyplot global state).
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"plotting the roofline needs matplotlib: {BENCH_EXTRA_HINT}") from err
    if not ceilings:
        raise ValueError("plot_roofline needs at least one measured Ceilings")
    lo = min([0.1, *(p.intensity / 3 for p in points)])
    hi = max([1e4, *(p.intensity * 3 for p in points)])
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, c in enumerate(ceilings):
        style = ["-", "--", ":", "-."][k % 4]
        label = f"roof {c.dtype}: GEMM {c.gemm_flops / 1e9:.0f} GFLOP/s, read {c.read_bytes_per_s / 1e9:.0f} GB/s"
        ax.plot(xs, [min(c.gemm_flops, c.read_bytes_per_s * x) / 1e9 for x in xs], "k" + style, lw=1.2, label=label)
    names = list(dict.fromkeys(p.implementation for p in points))
    markers = "osD^v<>ph*"
    for i, name in enumerate(names):
        mine = [p for p in points if p.implementation == name]
        ax.scatter([p.intensity for p in mine], [p.flops_per_s / 1e9 for p in mine], s=36, zorder=3,
                   marker=markers[i % len(markers)], label=name)
        for p in mine:
            ax.annotate(p.workload, (p.intensity, p.flops_per_s / 1e9), textcoords="offset points",
                        xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    top = max([c.gemm_flops for c in ceilings] + [p.flops_per_s for p in points]) / 1e9
    bottom = min([top / 100, *(p.flops_per_s / 1e9 / 3 for p in points)])
    ax.set_ylim(bottom, top * 2)
    ax.set_xlabel("arithmetic intensity (FLOP per byte of compulsory traffic)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(title or "roofline")
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="lower right")
    out = Path(path)
    fig.savefig(out)
    return out

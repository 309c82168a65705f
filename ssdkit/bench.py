"""Benchmark tools, model-agnostic: timing with warm-up and repeats, and the machine's own ceilings.

Figures are measured in the same run as the workloads they are compared with (shared machines are
noisy): a jitted GEMM at the dtype used gives the compute ceiling, a jitted streaming reduction the
memory-bandwidth ceiling.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def compile_clock():
    """Within it: a function giving the seconds JAX has spent tracing, lowering and compiling programs since
    the block began (``jax.monitoring``'s ``/jax/core/compile/...`` duration events), so that a rate can
    leave compilation out."""
    from jax import monitoring

    total = [0.0]

    def listen(event: str, seconds: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):
            total[0] += seconds

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield lambda: total[0]
    finally:
        monitoring.unregister_event_duration_listener(listen)


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


# ------------------------------------------------------------------------------ the recurrence kinds side by side
#: The transition kinds :func:`bench_scan` times: (per-channel decay?, rank-one term?). Keys are per head.
SCAN_KINDS = {
    "scalar": (False, False),  # Mamba-2's SSD
    "diagonal": (True, False),  # GLA
    "scalar+rank-one": (False, True),  # Gated DeltaNet
    "diagonal+rank-one": (True, True),  # KDA
}


@dataclasses.dataclass(frozen=True)
class ScanBench:
    """One transition kind timed at one shape (:func:`bench_scan`); seconds are medians.

    ``*_flops`` are XLA's count for the compiled program (``cost_analysis``), the work the program does.
    """

    kind: str
    heads: int
    head_dim: int
    state_dim: int
    seq: int
    batch: int
    chunk_size: int
    prefill_s: float
    prefill_flops: float
    train_s: float
    train_flops: float
    decode_step_s: float
    compile_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq / self.prefill_s

    @property
    def prefill_flops_per_s(self) -> float:
        return self.prefill_flops / self.prefill_s

    @property
    def train_flops_per_s(self) -> float:
        return self.train_flops / self.train_s


def _xla_flops(compiled) -> float:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list | tuple) else costs
    return float(costs.get("flops", float("nan")))


def scan_inputs(kind: str, *, heads: int, head_dim: int, state_dim: int, seq: int, batch: int = 1,
                dtype=jnp.float32, key: jax.Array | None = None):
    """Random inputs of :func:`ssdkit.ssd_scan` for ``kind`` (:data:`SCAN_KINDS`): ``((x, log_a, b, c), {w, u})``.
    Unit keys and a delta-rule-like rank-one term (``w = -β k``, ``u = k``, β in (0, 1)) keep the state bounded."""
    if kind not in SCAN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(SCAN_KINDS)}, got {kind!r}")
    per_channel, rank_one = SCAN_KINDS[kind]
    ks = jax.random.split(jax.random.key(0) if key is None else key, 6)
    lead = (batch, seq, heads)

    def unit(k):
        v = jax.random.normal(k, (*lead, state_dim))
        return (v / jnp.linalg.norm(v, axis=-1, keepdims=True)).astype(dtype)

    x = jax.random.normal(ks[0], (*lead, head_dim)).astype(dtype)
    log_a = (-jax.nn.softplus(jax.random.normal(ks[1], lead + ((state_dim,) if per_channel else ())))).astype(dtype)
    b, c = unit(ks[2]), unit(ks[3])
    extra = {}
    if rank_one:
        beta = jax.nn.sigmoid(jax.random.normal(ks[5], lead))[..., None].astype(dtype)
        extra = {"w": -beta * b, "u": b}
    return (x, log_a, b, c), extra


def bench_scan(kind: str, *, heads: int = 8, head_dim: int = 128, state_dim: int = 128, seq: int = 4096,
               batch: int = 1, chunk_size: int | None = None, repeats: int = 5, decode_steps: int = 64) -> ScanBench:
    """Time ``kind``'s chunked prefill (:func:`ssdkit.ssd_scan`), its training step (forward and backward
    through every input) and its O(1) decode step (:func:`ssdkit.ssd_step`, ``decode_steps`` in one
    compiled loop) at one shape, float32. ``chunk_size`` defaults to the backend's preferred one."""
    from ssdkit.core.scan import preferred_chunk_size, ssd_scan
    from ssdkit.core.step import ssd_step

    q = preferred_chunk_size(chunk_size or 256)
    args, extra = scan_inputs(kind, heads=heads, head_dim=head_dim, state_dim=state_dim, seq=seq, batch=batch)

    prefill = jax.jit(lambda x, la, b, c, kw: ssd_scan(x, la, b, c, chunk_size=q, **kw))
    compile_s, compiled = compile_seconds(prefill, *args, extra)
    t_prefill = time_calls(lambda: compiled(*args, extra), repeats=repeats)

    def loss(inputs):
        (x, la, b, c), kw = inputs
        y, final = ssd_scan(x, la, b, c, chunk_size=q, **kw)
        return jnp.sum(y * y) + jnp.sum(final)

    train = jax.jit(jax.grad(loss)).lower((args, extra)).compile()
    t_train = time_calls(lambda: train((args, extra)), repeats=repeats)

    state = jnp.zeros((batch, heads, head_dim, state_dim), jnp.float32)
    step_in = jax.tree_util.tree_map(lambda a: a[:, 0], (args, extra))

    @jax.jit
    def decode(state, inputs):
        (x, la, b, c), kw = inputs

        def body(_, s):
            return ssd_step(s, x, la, b, c, **kw)[1]

        return jax.lax.fori_loop(0, decode_steps, body, state)

    t_decode = time_calls(lambda: decode(state, step_in), repeats=repeats)
    return ScanBench(kind, heads, head_dim, state_dim, seq, batch, q, t_prefill.median, _xla_flops(compiled),
                     t_train.median, _xla_flops(train), t_decode.median / decode_steps, compile_s)

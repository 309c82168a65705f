"""Whether half-precision matrix products are faster than float32 ones on this machine: a short probe.

The rule (:func:`half_products`): bfloat16 weights multiply a whole sequence of activations in bfloat16
(accumulating in float32) where that is faster, and are upcast to float32 for the product where it is
not. On GPU and TPU it is faster, without asking. On XLA's CPU backend it depends on the CPU: on an AMD
EPYC with AVX-512-BF16 (Zen 4) bfloat16 GEMM measured about twice float32's rate (327 against 160
GFLOP/s), on an Intel Xeon with avx512_bf16 (no AMX) about half (118 against 218), on an AVX2-only AMD
EPYC (Zen 3) 38 against 52. So on CPU a probe decides:

* :func:`measure` times two GEMMs at a training/prefill shape (512 tokens through Mamba-2 130M's input
  and output projections, 768 ↔ 1,536), float32 inputs against bfloat16 inputs with float32 accumulation
  (``preferred_element_type``), alternating, the best of a few calls after compiling: about 0.6 s on 2
  busy AVX2 cores, compilation included. bfloat16 wins when it runs at least :data:`MARGIN` times
  float32's rate (near a tie float32, the more exact, is kept).
* The answer is cached on disk per machine kind (:func:`cached`): one small JSON file in
  ``$XDG_CACHE_HOME/ssdkit/`` (default ``~/.cache/ssdkit/``) per :class:`ProbeKey` — the CPU's model
  name and its matrix-relevant instruction-set flags (a VM may name only "AMD EPYC"), the jax and jaxlib
  versions, and ``XLA_FLAGS`` (``--xla_cpu_max_isa=AVX2`` changes the answer). A file that is missing,
  unreadable, corrupt or of another key is measured afresh and overwritten; a cache folder that cannot
  be written is skipped.
* Within a process, :func:`probe` remembers its answer per key (``functools.cache``, as the CPU's name and
  flags are): the file is read (or the probe run) at most once a process, when a half-precision program is
  first traced on CPU or ``ssdkit train --compute-dtype auto`` resolves.

``SSDKIT_HALF_MATMUL`` overrides the rule (:class:`HalfMatmul`): ``auto`` (the default: the rule above),
``bfloat16`` (half-precision weights always multiply in their own dtype, on every backend) or ``float32``
(always upcast for whole sequences). It is read when a program is traced: programs already compiled keep
the choice they were traced with. :func:`use_probe` makes :func:`probe` return a given result inside a
``with`` block (tests: no measuring, no disk); that and the per-process memo are this module's only state.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: The environment variable that overrides the probe (:class:`HalfMatmul`).
ENV_VAR = "SSDKIT_HALF_MATMUL"

#: bfloat16 products are chosen where they run at least this many times float32's rate.
MARGIN = 1.1

#: (tokens, inputs, outputs) of each timed product: 512 tokens through Mamba-2 130M's input projection (x
#: and z) and its output projection. 1.2 GFLOP each: tens of milliseconds a call on 2 cores, big enough for
#: the GEMM kernels' steady state (1,024 tokens gave the same bfloat16 : float32 ratio, 0.67 against 0.65
#: on an AVX2 EPYC, in twice the probe's time).
SHAPES = ((512, 768, 1536), (512, 1536, 768))

#: Timed calls per dtype (after one untimed call that compiles), fewer when the probe runs past
#: :data:`BUDGET_S` (on a CPU where bfloat16 is many times slower, the first call settles it).
REPEATS = 3
BUDGET_S = 1.0

#: /proc/cpuinfo flags that decide which matrix-product kernels XLA's CPU backend can use.
_MATMUL_FLAGS = frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                           "amx_bf16", "amx_tile", "asimd", "bf16", "sve", "sve2", "i8mm"})

_CACHE_VERSION = 1


class HalfMatmul(enum.Enum):
    """How half-precision weights multiply a whole sequence: ``SSDKIT_HALF_MATMUL``'s values."""

    AUTO = "auto"  # bfloat16 where it is faster (GPU, TPU; a CPU where the probe says so), else float32
    BFLOAT16 = "bfloat16"  # always in the weights' own half dtype
    FLOAT32 = "float32"  # always upcast to float32 (one token, decode, never upcasts)

    @classmethod
    def from_env(cls) -> HalfMatmul:
        """``$SSDKIT_HALF_MATMUL`` (unset or empty: ``auto``); anything else is a ValueError naming it."""
        value = os.environ.get(ENV_VAR, "").strip().lower() or "auto"
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ValueError(f"{ENV_VAR} must be one of {allowed}, got {os.environ[ENV_VAR]!r}; unset it for "
                             f"auto (a probe decides on CPU)") from None


@dataclasses.dataclass(frozen=True)
class ProbeKey:
    """What a probe's answer depends on: the machine kind, the compiler, the compiler's flags."""

    cpu: str  # /proc/cpuinfo's "model name" (or platform.processor(), platform.machine())
    cpu_flags: tuple[str, ...]  # the matrix-relevant instruction-set flags the CPU reports, sorted
    jax: str
    jaxlib: str
    xla_flags: str  # $XLA_FLAGS as set ("" when unset)

    @classmethod
    def current(cls) -> ProbeKey:
        """This process's key."""
        import jaxlib

        cpu, flags = _cpuinfo()
        return cls(cpu=cpu, cpu_flags=flags, jax=jax.__version__, jaxlib=jaxlib.__version__,
                   xla_flags=os.environ.get("XLA_FLAGS", "").strip())

    def file_name(self) -> str:
        """The cache file of this key: ``matmul-probe-<16 hex digits of its SHA-256>.json``."""
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()
        return f"matmul-probe-{digest[:16]}.json"


@dataclasses.dataclass(frozen=True)
class MatmulProbe:
    """One probe's answer: each dtype's GEMM rate (best call, summed over :data:`SHAPES`) on this CPU."""

    key: ProbeKey
    float32_gflops: float
    bfloat16_gflops: float
    seconds: float  # wall time of the measurement, compilation included

    @property
    def half_faster(self) -> bool:
        """True when bfloat16 products ran at least :data:`MARGIN` times float32's rate."""
        return self.bfloat16_gflops >= MARGIN * self.float32_gflops

    @property
    def faster(self) -> jnp.dtype:
        """The dtype whole-sequence products of bfloat16 weights run in: bfloat16 or float32."""
        return jnp.dtype(jnp.bfloat16 if self.half_faster else jnp.float32)

    def describe(self) -> str:
        """One line: both rates and the choice."""
        return (f"bfloat16 GEMM {self.bfloat16_gflops:.0f} GFLOP/s, float32 {self.float32_gflops:.0f} on "
                f"{self.key.cpu}: {self.faster.name} products")


@functools.cache  # the CPU does not change within a process; keys are made at every trace
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    """(model name, matmul-relevant flags) from /proc/cpuinfo's first processor; elsewhere platform's."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                field, _, value = line.partition(":")
                field = field.strip().lower()
                if field in ("model name", "cpu model", "hardware") and not name:
                    name = value.strip()
                elif field in ("flags", "features") and not flags:
                    flags = set(value.split()) & _MATMUL_FLAGS
                elif not line.strip() and name and flags:  # the first processor is enough
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown", tuple(sorted(flags))


def _rate(shapes, seconds: float) -> float:
    return sum(2.0 * m * k * n for m, k, n in shapes) / seconds / 1e9


def measure(key: ProbeKey | None = None, *, shapes=SHAPES, repeats: int = REPEATS,
            budget_s: float = BUDGET_S) -> MatmulProbe:
    """Time :data:`SHAPES`' products on the CPU in float32 and in bfloat16 (float32 accumulation): one
    untimed (compiling) call each, then up to ``repeats`` alternating timed calls each, the best kept; no
    more calls once ``budget_s`` has passed. Runs eagerly even when called while a program is traced."""
    key = ProbeKey.current() if key is None else key
    start = time.perf_counter()
    cpu = jax.devices("cpu")[0]
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32))
              for m, k, n in shapes]

    def products(pairs):
        return [jnp.dot(x, w, preferred_element_type=jnp.float32) for x, w in pairs]

    best = {}
    with jax.ensure_compile_time_eval():  # a concrete measurement, even inside a trace
        calls = {}
        for dtype in (jnp.float32, jnp.bfloat16):
            pairs = jax.device_put([(x.astype(dtype), w.astype(dtype)) for x, w in inputs], cpu)
            fn = jax.jit(products)
            jax.block_until_ready(fn(pairs))  # compile, and touch every buffer once
            calls[jnp.dtype(dtype).name] = functools.partial(fn, pairs)
            best[jnp.dtype(dtype).name] = math.inf
        for i in range(repeats):
            if i and time.perf_counter() - start > budget_s:
                break
            for name, call in calls.items():
                t = time.perf_counter()
                jax.block_until_ready(call())
                best[name] = min(best[name], time.perf_counter() - t)
    return MatmulProbe(key=key, float32_gflops=_rate(shapes, best["float32"]),
                       bfloat16_gflops=_rate(shapes, best["bfloat16"]), seconds=time.perf_counter() - start)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ssdkit`` (default ``~/.cache/ssdkit``): where probe results are kept."""
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base) if base else Path.home() / ".cache") / "ssdkit"


def _read(path: Path, key: ProbeKey) -> MatmulProbe | None:
    """The probe stored at ``path`` for ``key``; None when the file is missing, unreadable, malformed,
    holds non-positive rates or another key."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("version") != _CACHE_VERSION:
            return None
        stored = record["key"]
        stored = ProbeKey(**{**stored, "cpu_flags": tuple(stored["cpu_flags"])})
        result = MatmulProbe(key=stored, float32_gflops=float(record["float32_gflops"]),
                             bfloat16_gflops=float(record["bfloat16_gflops"]), seconds=float(record["seconds"]))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    rates = (result.float32_gflops, result.bfloat16_gflops)
    if stored != key or not all(math.isfinite(r) and r > 0 for r in rates):
        return None
    return result


def _write(path: Path, result: MatmulProbe) -> None:
    """Store ``result`` at ``path`` atomically (a temporary file renamed over it); skipped on any OSError."""
    record = {"version": _CACHE_VERSION, "key": dataclasses.asdict(result.key),
              "float32_gflops": result.float32_gflops, "bfloat16_gflops": result.bfloat16_gflops,
              "seconds": result.seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a cache is an optimisation: the next process measures again


def cached(key: ProbeKey | None = None, *, directory: str | Path | None = None,
           measure_fn: Callable[[ProbeKey], MatmulProbe] = measure) -> MatmulProbe:
    """The probe result for ``key`` (default: this process's) from its file in ``directory`` (default
    :func:`cache_dir`), or ``measure_fn(key)`` written there when the file is missing, corrupt or of
    another key. Reads and writes the disk on every call (:func:`probe` is the memoised one)."""
    key = ProbeKey.current() if key is None else key
    path = Path(cache_dir() if directory is None else directory) / key.file_name()
    result = _read(path, key)
    if result is None:
        result = measure_fn(key)
        _write(path, result)
    return result


@functools.cache
def _probe_once(key: ProbeKey) -> MatmulProbe:
    return cached(key)


_INJECTED: contextvars.ContextVar[MatmulProbe | None] = contextvars.ContextVar("ssdkit_matmul_probe", default=None)


def probe() -> MatmulProbe:
    """This machine's probe result: the one :func:`use_probe` gives, else :func:`cached`'s for this
    process's key, remembered for the rest of the process."""
    injected = _INJECTED.get()
    return injected if injected is not None else _probe_once(ProbeKey.current())


@contextlib.contextmanager
def use_probe(result: MatmulProbe) -> Iterator[MatmulProbe]:
    """Within the block :func:`probe` returns ``result``: nothing is measured, read or written. Programs
    traced inside follow it (jit caches by shapes: trace afresh, e.g. a new ``jax.jit``)."""
    token = _INJECTED.set(result)
    try:
        yield result
    finally:
        _INJECTED.reset(token)


def half_products(backend: str | None = None) -> bool:
    """Whether bfloat16 weights multiply a whole sequence in bfloat16 on ``backend`` (default: JAX's).

    ``SSDKIT_HALF_MATMUL`` = ``bfloat16``: yes; ``float32``: no; ``auto`` (default): yes on GPU and TPU,
    and on CPU when the probe (:func:`probe`) found bfloat16 GEMM faster than float32."""
    setting = HalfMatmul.from_env()
    if setting is not HalfMatmul.AUTO:
        return setting is HalfMatmul.BFLOAT16
    if (backend or jax.default_backend()) != "cpu":
        return True
    return probe().half_faster

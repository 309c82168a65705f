"""``ssdkit bench``: Mamba-2 prefill, decode and training throughput with roofline accounting.

For each weight dtype it measures the machine's ceilings in the same run (``ssdkit.bench``), then:

* prefill at each length: tokens/s, achieved FLOP/s (analytic count, ``ssdkit.models.mamba2.cost``), MFU
  against the measured GEMM peak of the dtype the products run in (``ssdkit.sequence_matmul_dtype``:
  float32 for half-precision weights on a CPU whose half-precision GEMM is the slower), compile time,
  XLA's planned scratch memory;
* decode at each batch size, through the compiled on-device generation loop: tokens/s, bytes moved per
  step (weights + cache), bandwidth use against the measured streaming bandwidth, compile time.

With ``--train`` it measures the training step of ``ssdkit train`` instead (``ssdkit.models.training.make_step``:
the blockwise loss, its gradient and the default AdamW update, float32 master weights) at each compute dtype
(``auto`` resolved as ``ssdkit train`` resolves it): tokens/s, achieved FLOP/s and MFU
(``ssdkit.models.mamba2.cost.train_flops``) against the GEMM peak of the dtype its products run in, compile
time and XLA's planned peak memory of the step (train state + batch + scratch).

Warm-up is excluded; the median of repeated runs is reported with min and max.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from ssdkit.bench import (
    Ceilings,
    RooflinePoint,
    compile_seconds,
    measure_ceilings,
    planned_peak_bytes,
    plot_roofline,
    temp_bytes,
    time_calls,
)
from ssdkit.models import mamba2
from ssdkit.models.mamba2 import cost


@dataclasses.dataclass(frozen=True)
class Result:
    workload: str  # "prefill" or "decode"
    dtype: str  # the weights'
    batch: int
    tokens: int  # prompt length (prefill) or generated tokens per row (decode)
    tokens_per_s: float
    seconds_median: float
    seconds_min: float
    seconds_max: float
    flops_per_s: float
    mfu: float  # against the measured GEMM peak of the products' dtype (sequence_matmul_dtype of dtype)
    bytes_per_step: int | None  # decode only
    bandwidth_util: float | None  # decode only, against the measured streaming read bandwidth
    compile_s: float
    scratch_bytes: int | None  # XLA's planned temporary memory of the compiled program
    intensity: float  # FLOPs per byte of compulsory traffic (ssdkit.models.mamba2.cost), for the roofline


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_prefill(params, cfg, ceil: Ceilings, *, batch: int, seq: int, repeats: int) -> Result:
    tokens = jax.random.randint(jax.random.key(seq), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    fn = mamba2.model.prefill_program
    compile_s, compiled = compile_seconds(fn, params, cfg, tokens, None, None)
    t = time_calls(lambda: compiled(params, tokens, None, None), repeats=repeats)
    flops = cost.prefill_flops(cfg, batch, seq, chunk_size=ssdkit.preferred_chunk_size(cfg.chunk_size))
    nbytes = cost.prefill_bytes(cfg, batch, seq, params.embedding.dtype)
    dtype = jnp.dtype(params.embedding.dtype).name
    return Result("prefill", dtype, batch, seq, batch * seq / t.median, t.median, t.min, t.max,
                  flops / t.median, flops / t.median / ceil.gemm_flops, None, None, compile_s, temp_bytes(compiled),
                  flops / nbytes)


def bench_decode(params, cfg, ceil: Ceilings, *, batch: int, steps: int, repeats: int, prompt_len: int = 8) -> Result:
    """Decode throughput of the on-device loop: (generate N+1 tokens - generate 1 token) / N steps."""
    prompt = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 0, cfg.vocab_size, jnp.int32)
    model = mamba2.Mamba2LM(cfg)

    def gen(n):
        return ssdkit.generate(model, params, prompt, max_new_tokens=n).tokens

    t0 = time.perf_counter()
    jax.block_until_ready(gen(steps + 1))
    first = time.perf_counter() - t0
    t_long = time_calls(lambda: gen(steps + 1), repeats=repeats)
    compile_s = max(first - t_long.median, 0.0)  # the first call compiles, then runs like the others
    t_short = time_calls(lambda: gen(1), repeats=repeats)
    per_step = max(t_long.median - t_short.median, 1e-9) / steps
    step_min = max(t_long.min - t_short.median, 1e-9) / steps
    step_max = max(t_long.max - t_short.median, 1e-9) / steps
    nbytes = cost.decode_bytes(cfg, batch, params.embedding.dtype).total
    flops = cost.decode_flops(cfg, batch)
    dtype = jnp.dtype(params.embedding.dtype).name
    return Result("decode", dtype, batch, steps, batch / per_step, per_step, step_min, step_max,
                  flops / per_step, flops / per_step / ceil.gemm_flops, nbytes,
                  nbytes / per_step / ceil.read_bytes_per_s, compile_s, None, flops / nbytes)


def model_config(model: str) -> mamba2.Mamba2Config:
    """A preset name, or ``key=value`` fields of ``Mamba2Config`` (e.g. ``d_model=256,n_layer=6,vocab_size=256``)."""
    if "=" not in model:
        return mamba2.Mamba2Config.preset(model)
    names = {f.name for f in dataclasses.fields(mamba2.Mamba2Config)}
    fields = {}
    for item in filter(None, model.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in names:
            raise ValueError(f"--model {model}: {key.strip()!r} is not a Mamba2Config field")
        try:
            fields[key.strip()] = float(value) if "." in value or "e" in value.lower() else int(value)
        except ValueError:
            raise ValueError(f"--model {model}: {key.strip()}={value!r} is not a number") from None
    return mamba2.Mamba2Config(**fields)


def load_params(model: str, dtype, seed: int = 0, *, stacked: bool = False):
    """(params, config) from a checkpoint directory, or random weights for a preset / ``key=value`` fields."""
    path = Path(model)
    if path.is_dir():
        params, cfg = mamba2.load_checkpoint(path, dtype=dtype, stacked=stacked)
        return params, cfg
    cfg = model_config(model)
    init = jax.jit(mamba2.init_params, static_argnums=(0, 2), static_argnames=("stacked",))
    return init(cfg, jax.random.key(seed), dtype, stacked=stacked), cfg


@dataclasses.dataclass(frozen=True)
class TrainResult:
    compute_dtype: str  # the weight matrices' dtype in the step (``auto`` resolved)
    matmul_dtype: str  # the dtype the whole-sequence products ran in, whose GEMM peak the MFU is against
    batch: int
    seq: int
    remat: str
    tokens_per_s: float
    seconds_median: float  # one step
    seconds_min: float
    seconds_max: float
    flops_per_s: float  # ssdkit.models.mamba2.cost.train_flops / step time
    mfu: float  # against the measured GEMM peak at matmul_dtype
    compile_s: float
    state_bytes: int  # parameters + optimiser state
    peak_bytes: int | None  # XLA's plan: arguments + outputs - donated + scratch


def train_batch(cfg: mamba2.Mamba2Config, batch: int, seq: int, seed: int = 0):
    """A (tokens, segment_ids) training batch of random ids (one document per row)."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    return tokens, jnp.zeros((batch, seq), jnp.int32)


def train_optimizer():
    """The optimiser of every timed training step (ssdkit's AdamW defaults, a 10k-step schedule)."""
    return ssdkit.adamw(3e-4, total_steps=10_000, warmup_steps=100)


def bench_train(params, cfg, ceil: Ceilings, *, batch: int, seq: int, remat: str = "none",
                compute_dtype: str = "float32", repeats: int = 3) -> TrainResult:
    """Time ``ssdkit train``'s step (float32 master ``params``; they are copied, not consumed); MFU against
    ``ceil``, which should be measured at the products' dtype (``training.resolve_compute_dtype``)."""
    from ssdkit.models import training

    compute = training.resolve_compute_dtype(compute_dtype)
    compute_dtype = compute.weights
    optimizer = train_optimizer()
    step = training.make_step(cfg, optimizer, remat=remat, compute_dtype=compute_dtype)
    state = [ssdkit.TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer)]
    data = train_batch(cfg, batch, seq)
    compile_s, compiled = compile_seconds(step, state[0], data)

    def one_step():
        state[0], metrics = compiled(state[0], data)
        return metrics.loss

    t = time_calls(one_step, repeats=repeats)
    flops = cost.train_flops(cfg, batch, seq, chunk_size=ssdkit.preferred_chunk_size(cfg.chunk_size))
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves((state[0].params, state[0].opt_state)))
    state.clear()  # release the train state before the next workload
    return TrainResult(compute_dtype, compute.products, batch, seq, remat, batch * seq / t.median, t.median, t.min,
                       t.max,
                       flops / t.median, flops / t.median / ceil.gemm_flops, compile_s, state_bytes,
                       planned_peak_bytes(compiled))


def run_train(model: str = "130m", compute_dtypes=("auto",), lengths=(512, 2048), batch: int = 1,
              remats=("none",), repeats: int = 3, config: mamba2.Mamba2Config | None = None):
    """Every training workload; returns (list of Ceilings, list of TrainResult). Each compute dtype (auto,
    float32, bfloat16) is resolved as ``ssdkit train`` resolves it, and the GEMM ceiling is measured at the
    dtype its products run in."""
    from ssdkit.models import training

    if config is None:
        params, cfg = load_params(model, jnp.float32, stacked=True)
    else:
        cfg, params = config, mamba2.init_params(config, jax.random.key(0), stacked=True)
    ceilings, results = [], []
    for dtype_name in compute_dtypes:
        compute = training.resolve_compute_dtype(dtype_name)
        _log(f"[bench] {compute.describe()}; measuring the machine's {compute.products} ceilings ...")
        ceil = measure_ceilings(jnp.dtype(compute.products))
        ceilings.append(ceil)
        _log(f"[bench]   {compute.products} GEMM {ceil.gemm_flops / 1e9:.1f} GFLOP/s (best "
             f"{ceil.gemm_flops_best / 1e9:.1f})")
        for seq in lengths:
            for remat in remats:
                _log(f"[bench]   train batch {batch} x {seq} tokens, {dtype_name} compute, remat {remat} ...")
                results.append(bench_train(params, cfg, ceil, batch=batch, seq=seq, remat=remat,
                                           compute_dtype=dtype_name, repeats=repeats))
                _log("[bench]     " + _fmt_train(results[-1]))
    return ceilings, results


def _fmt_train(r: TrainResult) -> str:
    peak = "" if r.peak_bytes is None else f", peak {r.peak_bytes / 2**20:,.0f} MiB"
    return (f"train {_compute(r)} b={r.batch} n={r.seq} remat={r.remat}: {r.tokens_per_s:,.1f} tokens/s "
            f"({r.seconds_median:.3f} s/step, min {r.seconds_min:.3f}, max {r.seconds_max:.3f}); "
            f"{r.flops_per_s / 1e9:.1f} GFLOP/s = {100 * r.mfu:.1f}% MFU; compile {r.compile_s:.1f} s{peak}")


def _compute(r: TrainResult) -> str:
    """The compute dtype, and the products' where they differ (bfloat16 weights upcast for the products)."""
    return r.compute_dtype if r.matmul_dtype == r.compute_dtype else f"{r.compute_dtype} ({r.matmul_dtype} products)"


def train_table(results: list[TrainResult]) -> str:
    head = ("| workload | compute | batch | tokens | remat | tokens/s | s/step (median) | GFLOP/s | MFU | compile s "
            "| state MiB | peak MiB |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| train | {_compute(r)} | {r.batch} | {r.seq} | {r.remat} | {r.tokens_per_s:,.1f} | "
        f"{r.seconds_median:.3f} | {r.flops_per_s / 1e9:.1f} | {100 * r.mfu:.1f}% | {r.compile_s:.1f} | "
        f"{r.state_bytes / 2**20:,.0f} | {'' if r.peak_bytes is None else f'{r.peak_bytes / 2**20:,.0f}'} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def run(model: str = "130m", dtypes=("float32",), prefill_lengths=(128, 512, 2048), prefill_batch: int = 1,
        decode_batches=(1, 16), decode_steps: int = 32, repeats: int = 5, config: mamba2.Mamba2Config | None = None):
    """Run every workload; returns (list of Ceilings, list of Result)."""
    ceilings, results = [], []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        products = ssdkit.sequence_matmul_dtype(dtype)  # the prefill's GEMM dtype, whose peak its MFU is against
        _log(f"[bench] {dtype_name}: measuring the machine's ceilings ({products.name} GEMM) ...")
        ceil = measure_ceilings(products)
        ceilings.append(ceil)
        _log(f"[bench]   GEMM {ceil.gemm_flops / 1e9:.1f} GFLOP/s (best {ceil.gemm_flops_best / 1e9:.1f}), "
             f"read {ceil.read_bytes_per_s / 1e9:.1f} GB/s (best {ceil.read_bytes_per_s_best / 1e9:.1f})")
        if config is None:
            params, cfg = load_params(model, dtype)
        else:
            cfg = config
            params = mamba2.init_params(cfg, jax.random.key(0), dtype)
        for seq in prefill_lengths:
            _log(f"[bench]   prefill batch {prefill_batch} x {seq} tokens ...")
            results.append(bench_prefill(params, cfg, ceil, batch=prefill_batch, seq=seq, repeats=repeats))
            _log("[bench]     " + _fmt(results[-1]))
        for batch in decode_batches:
            _log(f"[bench]   decode batch {batch}, {decode_steps} steps ...")
            results.append(bench_decode(params, cfg, ceil, batch=batch, steps=decode_steps, repeats=repeats))
            _log("[bench]     " + _fmt(results[-1]))
        del params
    return ceilings, results


def _fmt(r: Result) -> str:
    extra = ""
    if r.bandwidth_util is not None:
        extra = f", {r.bytes_per_step / 1e6:.0f} MB/step, {100 * r.bandwidth_util:.0f}% of bandwidth"
    return (f"{r.workload} {r.dtype} b={r.batch} n={r.tokens}: {r.tokens_per_s:,.1f} tokens/s "
            f"({r.seconds_median * 1e3:.2f} ms, min {r.seconds_min * 1e3:.2f}, max {r.seconds_max * 1e3:.2f}); "
            f"{r.flops_per_s / 1e9:.1f} GFLOP/s = {100 * r.mfu:.1f}% MFU{extra}; compile {r.compile_s:.2f} s")


def table(results: list[Result]) -> str:
    head = ("| workload | dtype | batch | tokens | tokens/s | ms (median) | GFLOP/s | MFU | bandwidth | compile s "
            "| scratch MiB |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r.workload} | {r.dtype} | {r.batch} | {r.tokens} | {r.tokens_per_s:,.1f} | {r.seconds_median * 1e3:.2f} | "
        f"{r.flops_per_s / 1e9:.1f} | {100 * r.mfu:.1f}% | "
        f"{'' if r.bandwidth_util is None else f'{100 * r.bandwidth_util:.0f}%'} | {r.compile_s:.2f} | "
        f"{'' if r.scratch_bytes is None else f'{r.scratch_bytes / 2**20:,.0f}'} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def roofline_points(results: list[Result], implementation: str = "ssdkit") -> list[RooflinePoint]:
    """Each result as a roofline point, labelled by workload (and the dtype in the implementation name)."""
    def label(r: Result) -> str:
        return f"prefill {r.tokens}" if r.workload == "prefill" else f"decode b={r.batch}"

    return [RooflinePoint(f"{implementation} {r.dtype}", label(r), r.flops_per_s, r.intensity) for r in results]


def run_scan(shape=(8, 128, 128, 4096), batch: int = 1, repeats: int = 5, kinds=None):
    """The transition kinds' chunked scan side by side (``ssdkit.bench.bench_scan``) at ``shape`` = (H, P, N, T),
    after the float32 GEMM ceiling measured in the same run: ``(ceilings, results)``."""
    from ssdkit.bench import SCAN_KINDS, bench_scan

    heads, head_dim, state_dim, seq = shape
    ceil = measure_ceilings(jnp.float32)
    _log(f"[bench] float32 GEMM {ceil.gemm_flops / 1e9:.1f} GFLOP/s (median)")
    results = []
    for kind in kinds or SCAN_KINDS:
        results.append(bench_scan(kind, heads=heads, head_dim=head_dim, state_dim=state_dim, seq=seq, batch=batch,
                                  repeats=repeats))
        _log(f"[bench] {kind} done")
    return [ceil], results


def scan_table(ceil: Ceilings, results) -> str:
    """Markdown table of :func:`run_scan`'s results; cost per token relative to the first row (scalar)."""
    base = results[0]
    lines = ["| kind | chunk | prefill tok/s | prefill GFLOP/s (XLA count) | of GEMM | cost/token vs "
             f"{base.kind} | train step ms | train GFLOP/s | of GEMM | decode step µs | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kind} | {r.chunk_size} | {r.tokens_per_s:,.0f} | {r.prefill_flops_per_s / 1e9:.1f} "
                     f"({r.prefill_flops / 1e9:.2f} G) | {r.prefill_flops_per_s / ceil.gemm_flops:.0%} | "
                     f"{r.prefill_s / base.prefill_s:.2f}x | {r.train_s * 1e3:.0f} | {r.train_flops_per_s / 1e9:.1f} | "
                     f"{r.train_flops_per_s / ceil.gemm_flops:.0%} | {r.decode_step_s * 1e6:.1f} | {r.compile_s:.1f} |")
    return "\n".join(lines)


def main(args) -> int:
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    print(f"[bench] JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
          file=sys.stderr)
    if args.scan:
        ceilings, results = run_scan(ints(args.scan_shape), args.prefill_batch, args.repeats)
        print(scan_table(ceilings[0], results))
    elif args.train:
        ceilings, results = run_train(args.model, tuple(args.dtype.split(",")), ints(args.train_lengths),
                                      args.train_batch, tuple(args.remat.split(",")), args.repeats)
        print(train_table(results))
    else:
        ceilings, results = run(args.model, tuple(args.dtype.split(",")), ints(args.prefill_lengths),
                                args.prefill_batch, ints(args.decode_batches), args.decode_steps, args.repeats)
        print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "jax": jax.__version__, "backend": jax.devices()[0].platform, "model": args.model,
            "ceilings": [dataclasses.asdict(c) for c in ceilings],
            "results": [dataclasses.asdict(r) for r in results],
        }, indent=2, default=lambda o: None if isinstance(o, float) and not np.isfinite(o) else o))
    if args.plot and not (args.train or args.scan):
        title = f"Mamba-2 {args.model} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
        _log(f"[bench] roofline written to {plot_roofline(ceilings, roofline_points(results), args.plot, title=title)}")
    return 0

"""``ssdkit bench``: Mamba-2 prefill and decode throughput with roofline accounting.

For each weight dtype it measures the machine's ceilings in the same run (``ssdkit.bench``), then:

* prefill at each length: tokens/s, achieved FLOP/s (analytic count, ``models.mamba2.cost``), MFU
  against the measured GEMM peak, compile time, XLA's planned scratch memory;
* decode at each batch size, through the compiled on-device generation loop: tokens/s, bytes moved per
  step (weights + cache), bandwidth use against the measured streaming bandwidth, compile time.

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
from models import mamba2
from models.mamba2 import cost
from ssdkit.bench import (
    Ceilings,
    RooflinePoint,
    compile_seconds,
    measure_ceilings,
    plot_roofline,
    temp_bytes,
    time_calls,
)


@dataclasses.dataclass(frozen=True)
class Result:
    workload: str  # "prefill" or "decode"
    dtype: str
    batch: int
    tokens: int  # prompt length (prefill) or generated tokens per row (decode)
    tokens_per_s: float
    seconds_median: float
    seconds_min: float
    seconds_max: float
    flops_per_s: float
    mfu: float  # against the measured GEMM peak at this dtype
    bytes_per_step: int | None  # decode only
    bandwidth_util: float | None  # decode only, against the measured streaming read bandwidth
    compile_s: float
    scratch_bytes: int | None  # XLA's planned temporary memory of the compiled program
    intensity: float  # FLOPs per byte of compulsory traffic (models.mamba2.cost), for the roofline


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_prefill(params, cfg, ceil: Ceilings, *, batch: int, seq: int, repeats: int) -> Result:
    tokens = jax.random.randint(jax.random.key(seq), (batch, seq), 0, cfg.vocab_size, jnp.int32)
    fn = mamba2.model._prefill
    compile_s, compiled = compile_seconds(fn, params, cfg, tokens, None, None)
    t = time_calls(lambda: compiled(params, tokens, None, None), repeats=repeats)
    flops = cost.prefill_flops(cfg, batch, seq, chunk_size=ssdkit.preferred_chunk_size(cfg.chunk_size))
    nbytes = cost.prefill_bytes(cfg, batch, seq, params.embedding.dtype)
    return Result("prefill", ceil.dtype, batch, seq, batch * seq / t.median, t.median, t.min, t.max,
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
    return Result("decode", ceil.dtype, batch, steps, batch / per_step, per_step, step_min, step_max,
                  flops / per_step, flops / per_step / ceil.gemm_flops, nbytes,
                  nbytes / per_step / ceil.read_bytes_per_s, compile_s, None, flops / nbytes)


def load_params(model: str, dtype, seed: int = 0):
    path = Path(model)
    if path.is_dir():
        params, cfg = mamba2.load_checkpoint(path, dtype=dtype)
        return params, cfg
    cfg = mamba2.Mamba2Config.preset(model)
    params = jax.jit(mamba2.init_params, static_argnums=(0, 2))(cfg, jax.random.key(seed), dtype)
    return params, cfg


def run(model: str = "130m", dtypes=("float32",), prefill_lengths=(128, 512, 2048), prefill_batch: int = 1,
        decode_batches=(1, 16), decode_steps: int = 32, repeats: int = 5, config: mamba2.Mamba2Config | None = None):
    """Run every workload; returns (list of Ceilings, list of Result)."""
    ceilings, results = [], []
    for dtype_name in dtypes:
        dtype = jnp.dtype(dtype_name)
        _log(f"[bench] {dtype_name}: measuring the machine's ceilings ...")
        ceil = measure_ceilings(dtype)
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


def main(args) -> int:
    ints = lambda s: tuple(int(v) for v in s.split(",") if v)  # noqa: E731
    print(f"[bench] JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})",
          file=sys.stderr)
    ceilings, results = run(args.model, tuple(args.dtype.split(",")), ints(args.prefill_lengths), args.prefill_batch,
                            ints(args.decode_batches), args.decode_steps, args.repeats)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "jax": jax.__version__, "backend": jax.devices()[0].platform, "model": args.model,
            "ceilings": [dataclasses.asdict(c) for c in ceilings],
            "results": [dataclasses.asdict(r) for r in results],
        }, indent=2, default=lambda o: None if isinstance(o, float) and not np.isfinite(o) else o))
    if args.plot:
        title = f"Mamba-2 {args.model} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind})"
        _log(f"[bench] roofline written to {plot_roofline(ceilings, roofline_points(results), args.plot, title=title)}")
    return 0

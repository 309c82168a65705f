"""The benchmark's FLOP and byte formulas, and the harness end to end on a tiny config (no timing asserts)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssdkit.bench
from ssdkit.bench import plot_roofline
from ssdkit.models import bench, mamba2
from ssdkit.models.cli import build_parser, main
from ssdkit.models.mamba2 import cost
from tests.helpers import TINY_TRAIN_BATCH, TINY_TRAIN_MODEL, cli_on_the_suite_cache

CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=100, d_state=16, headdim=16, chunk_size=16)
#: the harness runs (compiles) the tiny model; the formulas are checked on CFG without compiling anything
TINY = bench.model_config(TINY_TRAIN_MODEL)


@pytest.fixture(autouse=True)
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


@pytest.fixture
def small_ceilings(monkeypatch):
    """The ceilings' own code on a 128² GEMM and a 1 MiB read, once each: the harness's bookkeeping is under
    test, not this machine's peak (a 2048² GEMM and 512 MiB read, 8 times each, cost seconds a run)."""
    monkeypatch.setattr(bench, "measure_ceilings",
                        functools.partial(ssdkit.bench.measure_ceilings, n=128, read_mib=1, repeats=1))


def _nbytes(tree) -> int:
    return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))


def _lowered_flops(fn, *args) -> float:
    """XLA's FLOP count of ``fn``'s lowered program (its cost analysis before optimisation; nothing compiles)."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis["flops"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_bytes_are_the_parameter_and_cache_bytes(dtype):
    params = jax.eval_shape(lambda: mamba2.cast_params(mamba2.init_params(CFG, jax.random.key(0)), dtype))
    cache = jax.eval_shape(lambda: mamba2.init_cache(CFG, 3, dtype))
    b = cost.decode_bytes(CFG, 3, dtype)
    assert b.weights == _nbytes(params)
    assert b.cache == 2 * _nbytes(cache)


def test_prefill_bytes_are_weights_cache_and_tokens():
    weights = _nbytes(jax.eval_shape(lambda: mamba2.init_params(CFG, jax.random.key(0))))
    cache = _nbytes(jax.eval_shape(lambda: mamba2.init_cache(CFG, 2)))
    assert cost.prefill_bytes(CFG, 2, 50) == weights + cache + 4 * 2 * 50
    # bytes per weight given as a number (quantised formats): float32 params stay 4 bytes
    f32_params = 3 * CFG.n_layer * CFG.nheads
    assert cost.decode_bytes(CFG, 1, 1.0625).weights == (CFG.num_params() - f32_params) * 1.0625 + 4 * f32_params


def test_flop_formulas_agree_with_xla_cost_analysis():
    """The analytic counts leave out norms and activations, and count full Q×Q chunk blocks, so they sit
    a little off XLA's count (about 0.93 of it here); a term missing from the formula would be off by far
    more than 25%. One layer: XLA's cost analysis counts a loop body once, whatever its trip count."""
    cfg = mamba2.Mamba2Config(**{**CFG.__dict__, "n_layer": 1})
    params = jax.eval_shape(lambda: mamba2.init_params(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: mamba2.init_cache(cfg, 2))
    xla_decode = _lowered_flops(lambda p, t, c: mamba2.model._decode(p, cfg, t, c), params,
                                jax.ShapeDtypeStruct((2,), jnp.int32), cache)
    assert 0.75 < cost.decode_flops(cfg, 2) / xla_decode < 1.25
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    xla_prefill = _lowered_flops(lambda p, t: mamba2.model.prefill_program(p, cfg, t, None, None), params, tokens)
    assert 0.75 < cost.prefill_flops(cfg, 2, 64) / xla_prefill < 1.25


def test_train_flops_agree_with_xla_cost_analysis():
    """3x the forward over every position, the head at every position with a next token. XLA counts the
    backward pass's products directly; the formula leaves out norms, activations and the optimiser, and
    the head's blocks are one block here (XLA counts a loop body once). 25% as above."""
    cfg = mamba2.Mamba2Config(**{**CFG.__dict__, "n_layer": 1})
    params = jax.eval_shape(lambda: mamba2.init_params(cfg, jax.random.key(0)))
    tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
    xla_train = _lowered_flops(jax.value_and_grad(lambda p, t: mamba2.loss(p, cfg, t)[0]), params, tokens)
    assert 0.75 < cost.train_flops(cfg, 2, 64) / xla_train < 1.25
    # the same per-token terms as prefill, times 3, with the head at the 63 positions that have a target
    head = 2 * cfg.d_model * cfg.padded_vocab_size
    want = 3 * (cost.prefill_flops(cfg, 2, 64) - 2 * head + 2 * 63 * head)
    assert cost.train_flops(cfg, 2, 64) == pytest.approx(want)


def test_bench_runs_end_to_end(tmp_path, small_ceilings):
    ceilings, results = bench.run(dtypes=("float32",), prefill_lengths=(32,), decode_batches=(2,), decode_steps=3,
                                  repeats=1, config=TINY)
    assert ceilings[0].gemm_flops > 0 and ceilings[0].read_bytes_per_s > 0
    assert [r.workload for r in results] == ["prefill", "decode"]
    for r in results:
        assert np.isfinite(r.tokens_per_s) and r.tokens_per_s > 0 and r.compile_s > 0
    assert results[1].bytes_per_step == cost.decode_bytes(TINY, 2).total
    assert results[1].intensity == pytest.approx(cost.decode_flops(TINY, 2) / cost.decode_bytes(TINY, 2).total)
    assert results[0].intensity == pytest.approx(cost.prefill_flops(TINY, 1, 32) / cost.prefill_bytes(TINY, 1, 32))
    assert results[0].scratch_bytes is not None and results[0].scratch_bytes > 0
    assert "| prefill | float32 | 1 | 32 |" in bench.table(results)

    png = plot_roofline(ceilings, bench.roofline_points(results), tmp_path / "roofline.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [p.workload for p in bench.roofline_points(results)] == ["prefill 32", "decode b=2"]


def test_bench_train_runs_end_to_end(tmp_path, capsys, small_ceilings):
    """``ssdkit bench --train`` on the tiny model, two remat policies, its table and its JSON record. Its
    steps are tests/test_train.py's (the same model, optimiser and batch): compiled once a run. The compute
    dtype is the default, auto, resolved as ``ssdkit train`` resolves it (float32 under tests/conftest.py's
    pin), and the GEMM ceiling is measured at the products' dtype."""
    rows, seq = TINY_TRAIN_BATCH
    out = tmp_path / "train.json"
    assert main(["bench", "--train", "--model", TINY_TRAIN_MODEL, "--train-lengths", str(seq), "--train-batch",
                 str(rows), "--remat", "none,layer", "--repeats", "1", "--json", str(out)]) == 0
    assert f"| train | float32 | {rows} | {seq} | layer |" in capsys.readouterr().out
    assert build_parser().parse_args(["bench"]).remat == "layer"  # ssdkit train's default
    record = json.loads(out.read_text())
    assert record["ceilings"][0]["gemm_flops"] > 0 and record["ceilings"][0]["dtype"] == "float32"
    results = [bench.TrainResult(**r) for r in record["results"]]
    assert [(r.seq, r.remat) for r in results] == [(seq, "none"), (seq, "layer")]
    for r in results:
        assert (r.compute_dtype, r.matmul_dtype) == ("float32", "float32")
        assert np.isfinite(r.tokens_per_s) and r.tokens_per_s > 0 and r.compile_s > 0
        assert r.flops_per_s == pytest.approx(cost.train_flops(TINY, rows, seq) / r.seconds_median)
        # the train state is float32 parameters + AdamW's two moments (+ a few scalars)
        assert 3 * TINY.num_params() * 4 <= r.state_bytes < 3 * TINY.num_params() * 4 + 1024
        assert r.peak_bytes is not None and r.peak_bytes > r.state_bytes
    assert f"| train | float32 | {rows} | {seq} | none |" in bench.train_table(results)
    upcast = dataclasses.replace(results[0], compute_dtype="bfloat16")  # bfloat16 weights, float32 products
    assert f"| train | bfloat16 (float32 products) | {rows} |" in bench.train_table([upcast])


def test_bench_flag_errors(capsys):
    assert main(["bench", "--train", "--model", TINY_TRAIN_MODEL, "--remat", "all"]) == 2
    assert "--remat 'all' is not one of none, layer, matmuls" in capsys.readouterr().err
    assert main(["bench", "--train", "--model", TINY_TRAIN_MODEL, "--dtype", "float16"]) == 2
    assert "--dtype 'float16' is not one of auto, float32, bfloat16 (with --train)" in capsys.readouterr().err
    assert main(["bench", "--model", TINY_TRAIN_MODEL, "--dtype", "auto"]) == 2  # weights: no auto
    assert "--dtype 'auto' is not one of float32, bfloat16, float16" in capsys.readouterr().err
    assert main(["bench", "--model", "d_model=big"]) == 2
    assert "is not a number" in capsys.readouterr().err
    for flag, value, message in (("--prefill-lengths", "128,0", "comma-separated ints >= 1, got '128,0'"),
                                 ("--decode-batches", "1,x", "comma-separated ints >= 1, got '1,x'"),
                                 ("--repeats", "0", "--repeats must be an int >= 1, got 0"),
                                 ("--decode-steps", "0", "--decode-steps must be an int >= 1, got 0"),
                                 ("--prefill-batch", "-1", "--prefill-batch must be an int >= 1, got -1")):
        assert main(["bench", "--model", TINY_TRAIN_MODEL, flag, value]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_model_fields_on_the_command_line():
    cfg = bench.model_config("d_model=256,n_layer=6,vocab_size=256,norm_eps=1e-6")
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.norm_eps) == (256, 6, 256, 1e-6)
    assert bench.model_config("130m") == mamba2.Mamba2Config.preset("130m")
    with pytest.raises(ValueError, match="'width' is not a Mamba2Config field"):
        bench.model_config("width=3")
    with pytest.raises(ValueError, match="is not a number"):
        bench.model_config("d_model=big")


@pytest.mark.long  # 12 small programs (4 kinds x prefill, train step, decode loop)
def test_bench_scan_runs_every_kind_end_to_end(tmp_path, capsys, small_ceilings):
    """``ssdkit bench --scan`` at a tiny shape: every transition kind's row, finite positive figures, the JSON."""
    out = tmp_path / "scan.json"
    assert main(["bench", "--scan", "--scan-shape", "2,4,4,24", "--repeats", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert [r["kind"] for r in record["results"]] == list(ssdkit.bench.SCAN_KINDS)
    for r in record["results"]:
        assert r["prefill_s"] > 0 and r["train_s"] > 0 and r["decode_step_s"] > 0 and r["prefill_flops"] > 0
        assert f"| {r['kind']} |" in table


def test_bench_scan_shape_is_four_ints(capsys):
    assert main(["bench", "--scan", "--scan-shape", "8,128,128"]) == 2
    assert "--scan-shape must be four ints H,P,N,T" in capsys.readouterr().err

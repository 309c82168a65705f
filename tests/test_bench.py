"""The benchmark's FLOP and byte formulas, and the harness end to end on a tiny config (no timing asserts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdkit.bench import plot_roofline
from ssdkit.models import bench, mamba2
from ssdkit.models.mamba2 import cost

CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=100, d_state=16, headdim=16, chunk_size=16)


def _xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis["flops"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_bytes_are_the_parameter_and_cache_bytes(dtype):
    params = mamba2.cast_params(mamba2.init_params(CFG, jax.random.key(0)), dtype)
    weights = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    cache = mamba2.init_cache(CFG, 3, dtype)
    b = cost.decode_bytes(CFG, 3, dtype)
    assert b.weights == weights
    assert b.cache == 2 * sum(a.nbytes for a in jax.tree_util.tree_leaves(cache))


def test_prefill_bytes_are_weights_cache_and_tokens():
    params = mamba2.init_params(CFG, jax.random.key(0))
    weights = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))
    cache = sum(a.nbytes for a in jax.tree_util.tree_leaves(mamba2.init_cache(CFG, 2)))
    assert cost.prefill_bytes(CFG, 2, 50) == weights + cache + 4 * 2 * 50
    # bytes per weight given as a number (quantised formats): float32 params stay 4 bytes
    f32_params = 3 * CFG.n_layer * CFG.nheads
    assert cost.decode_bytes(CFG, 1, 1.0625).weights == (CFG.num_params() - f32_params) * 1.0625 + 4 * f32_params


def test_flop_formulas_agree_with_xla_cost_analysis():
    """The analytic counts leave out norms and activations, and count full Q×Q chunk blocks, so they sit
    a little off XLA's count; a term missing from the formula would be off by far more than 25%.
    One layer: XLA's cost analysis counts a loop body once, whatever its trip count."""
    cfg = mamba2.Mamba2Config(**{**CFG.__dict__, "n_layer": 1})
    params = mamba2.init_params(cfg, jax.random.key(0))
    cache = mamba2.init_cache(cfg, 2)
    xla_decode = _xla_flops(lambda p, t, c: mamba2.model._decode(p, cfg, t, c), params,
                            jnp.zeros((2,), jnp.int32), cache)
    assert 0.75 < cost.decode_flops(cfg, 2) / xla_decode < 1.25
    tokens = jnp.zeros((2, 64), jnp.int32)
    xla_prefill = _xla_flops(lambda p, t: mamba2.model.prefill_program(p, cfg, t, None, None), params, tokens)
    assert 0.75 < cost.prefill_flops(cfg, 2, 64) / xla_prefill < 1.25


def test_bench_runs_end_to_end(tmp_path):
    ceilings, results = bench.run(dtypes=("float32",), prefill_lengths=(32,), decode_batches=(2,), decode_steps=3,
                                  repeats=1, config=CFG)
    assert ceilings[0].gemm_flops > 0 and ceilings[0].read_bytes_per_s > 0
    assert [r.workload for r in results] == ["prefill", "decode"]
    for r in results:
        assert np.isfinite(r.tokens_per_s) and r.tokens_per_s > 0 and r.compile_s > 0
    assert results[1].bytes_per_step == cost.decode_bytes(CFG, 2).total
    assert results[1].intensity == pytest.approx(cost.decode_flops(CFG, 2) / cost.decode_bytes(CFG, 2).total)
    assert results[0].intensity == pytest.approx(cost.prefill_flops(CFG, 1, 32) / cost.prefill_bytes(CFG, 1, 32))
    assert results[0].scratch_bytes is not None and results[0].scratch_bytes > 0
    assert "| prefill | float32 | 1 | 32 |" in bench.table(results)

    png = plot_roofline(ceilings, bench.roofline_points(results), tmp_path / "roofline.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [p.workload for p in bench.roofline_points(results)] == ["prefill 32", "decode b=2"]


def test_train_flops_agree_with_xla_cost_analysis():
    """3x the forward over every position, the head at every position with a next token. XLA counts the
    backward pass's products directly; the formula leaves out norms, activations and the optimiser, and
    the head's blocks are one block here (XLA counts a loop body once). 25% as above."""
    cfg = mamba2.Mamba2Config(**{**CFG.__dict__, "n_layer": 1})
    params = mamba2.init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 64), jnp.int32)
    xla_train = _xla_flops(jax.value_and_grad(lambda p, t: mamba2.loss(p, cfg, t)[0]), params, tokens)
    assert 0.75 < cost.train_flops(cfg, 2, 64) / xla_train < 1.25
    # the same per-token terms as prefill, times 3, with the head at the 63 positions that have a target
    head = 2 * cfg.d_model * cfg.padded_vocab_size
    want = 3 * (cost.prefill_flops(cfg, 2, 64) - 2 * head + 2 * 63 * head)
    assert cost.train_flops(cfg, 2, 64) == pytest.approx(want)


def test_bench_train_runs_end_to_end():
    ceilings, results = bench.run_train(compute_dtypes=("float32",), lengths=(32,), batch=2,
                                        remats=("none", "layer"), repeats=1, config=CFG)
    assert ceilings[0].gemm_flops > 0
    assert [(r.seq, r.remat) for r in results] == [(32, "none"), (32, "layer")]
    for r in results:
        assert np.isfinite(r.tokens_per_s) and r.tokens_per_s > 0 and r.compile_s > 0
        assert r.flops_per_s == pytest.approx(cost.train_flops(CFG, 2, 32) / r.seconds_median)
        # the train state is float32 parameters + AdamW's two moments (+ a few scalars)
        assert 3 * CFG.num_params() * 4 <= r.state_bytes < 3 * CFG.num_params() * 4 + 1024
        assert r.peak_bytes is not None and r.peak_bytes > r.state_bytes
    assert "| train | float32 | 2 | 32 | layer |" in bench.train_table(results)


def test_model_fields_on_the_command_line():
    cfg = bench.model_config("d_model=256,n_layer=6,vocab_size=256,norm_eps=1e-6")
    assert (cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.norm_eps) == (256, 6, 256, 1e-6)
    assert bench.model_config("130m") == mamba2.Mamba2Config.preset("130m")
    with pytest.raises(ValueError, match="'width' is not a Mamba2Config field"):
        bench.model_config("width=3")
    with pytest.raises(ValueError, match="is not a number"):
        bench.model_config("d_model=big")

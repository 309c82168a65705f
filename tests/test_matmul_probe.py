"""The half-precision products probe (ssdkit.matmul_probe) and the decisions that follow it: the whole-sequence
product dtype (ssdkit.sequence_matmul_dtype) and ``ssdkit train --compute-dtype auto``. Fake probe results
(``use_probe``) and a fake measurement (``cached(..., measure_fn=...)``) keep these cases off the disk and the
clock, but for one real probe that must finish in under 2 seconds."""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ssdkit import matmul_probe, sequence_einsum, sequence_matmul_dtype
from ssdkit.matmul_probe import ENV_VAR, HalfMatmul, MatmulProbe, ProbeKey, use_probe
from ssdkit.models import training
from tests.helpers import assert_close

KEY = ProbeKey(cpu="Test CPU 9000", cpu_flags=("avx2", "fma"), jax="0.0", jaxlib="0.0", xla_flags="")
BF16, F16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)


def _probe(bfloat16_gflops: float, float32_gflops: float = 100.0, key: ProbeKey = KEY) -> MatmulProbe:
    return MatmulProbe(key=key, float32_gflops=float32_gflops, bfloat16_gflops=bfloat16_gflops, seconds=0.5)


FASTER, SLOWER = _probe(200.0), _probe(50.0)  # bfloat16 GEMM at 2x and at 0.5x float32's rate


@pytest.fixture
def auto(monkeypatch, tmp_path):
    """``SSDKIT_HALF_MATMUL`` unset (tests/conftest.py pins float32), and a cache folder that must stay empty."""
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    yield
    assert not any(tmp_path.iterdir()), "a fake probe touched the disk"


def test_the_environment_variable_and_a_bad_value(monkeypatch):
    for value, want in (("auto", HalfMatmul.AUTO), ("", HalfMatmul.AUTO), (" BFloat16 ", HalfMatmul.BFLOAT16),
                        ("float32", HalfMatmul.FLOAT32)):
        monkeypatch.setenv(ENV_VAR, value)
        assert HalfMatmul.from_env() is want
    monkeypatch.setenv(ENV_VAR, "fast")
    message = "SSDKIT_HALF_MATMUL must be one of auto, bfloat16, float32, got 'fast'"
    with pytest.raises(ValueError, match=message):
        sequence_matmul_dtype(BF16, "cpu")
    with pytest.raises(ValueError, match=message):
        training.resolve_compute_dtype("auto")
    assert sequence_matmul_dtype(F32, "cpu") == F32  # full-precision weights never ask


def test_a_fake_probe_switches_the_product_dtype_and_training_auto(auto):
    """On CPU the probe decides for bfloat16 weights (float16 is not probed: float32); GPU and TPU multiply
    in half precision without asking; float32 and float64 weights are never changed."""
    assert FASTER.half_faster and FASTER.faster == BF16 and not SLOWER.half_faster and SLOWER.faster == F32
    assert not _probe(105.0).half_faster  # within MARGIN of a tie: float32, the more exact
    for fake, want in ((FASTER, BF16), (SLOWER, F32)):
        with use_probe(fake):
            assert matmul_probe.probe() is fake
            assert sequence_matmul_dtype(BF16, "cpu") == want
            assert sequence_matmul_dtype(F16, "cpu") == F32
            assert sequence_matmul_dtype(BF16, "gpu") == BF16 and sequence_matmul_dtype(F16, "tpu") == F16
            assert sequence_matmul_dtype(F32, "cpu") == F32 and sequence_matmul_dtype(jnp.float64, "cpu") == "float64"

            auto_ = training.resolve_compute_dtype("auto", "cpu")
            assert (auto_.weights, auto_.products) == (want.name, want.name)
            assert fake.describe() in auto_.describe()
            asked = training.resolve_compute_dtype("bfloat16", "cpu")  # bfloat16 weights, products as decided
            assert (asked.weights, asked.products) == ("bfloat16", want.name)
            assert training.resolve_compute_dtype("float32", "cpu").products == "float32"
            gpu = training.resolve_compute_dtype("auto", "gpu")
            assert (gpu.weights, gpu.products) == ("bfloat16", "bfloat16")


def test_the_environment_variable_overrides_the_probe(auto, monkeypatch):
    for value, fake, want in (("bfloat16", SLOWER, BF16), ("float32", FASTER, F32)):
        monkeypatch.setenv(ENV_VAR, value)
        with use_probe(fake):
            assert sequence_matmul_dtype(BF16, "cpu") == want and sequence_matmul_dtype(BF16, "gpu") == want
            assert sequence_matmul_dtype(F16, "cpu") == (F16 if want == BF16 else F32)
            resolved = training.resolve_compute_dtype("auto", "cpu")
            assert resolved.weights == want.name and resolved.reason == f"{ENV_VAR}={value}"


def test_a_half_product_and_its_gradient(monkeypatch):
    """sequence_einsum with bfloat16 products: the product and both gradients against float64 math on the
    same bfloat16-rounded operands (the cotangent rounded too: 8 significant bits, 0.4% spacing, sums of 8
    terms: 2% of the largest entry is ample), float32 results, and the gradients in the operands' dtypes."""
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    rng = np.random.default_rng(0)
    x, ct = rng.standard_normal((2, 5, 8), np.float32), rng.standard_normal((2, 5, 6), np.float32)
    w = rng.standard_normal((6, 8), np.float32).astype(ml_dtypes.bfloat16)

    @jax.jit
    def product_and_vjp(x, w, ct):
        y, vjp = jax.vjp(lambda x, w: sequence_einsum("...d,ed->...e", x, w), x, w)
        return y, *vjp(ct)

    y, gx, gw = product_and_vjp(x, w, ct)
    assert (y.dtype, gx.dtype, gw.dtype) == (F32, F32, BF16)
    x64, w64, ct64 = (a.astype(ml_dtypes.bfloat16).astype(np.float64) for a in (x, w, ct))
    assert_close(y, np.einsum("...d,ed->...e", x64, w64), rtol=1e-6, name="product")
    assert_close(gx, np.einsum("...e,ed->...d", ct64, w64), rtol=0.02, name="d/dx")
    assert_close(gw, np.einsum("bte,btd->ed", ct64, x64), rtol=0.02, name="d/dw")


def test_the_disk_cache(tmp_path):
    """Written on first use, read back after; a corrupt file, one of another key or with nonsense figures is
    measured afresh and overwritten; another key (other XLA_FLAGS) has a file of its own; a cache folder that
    cannot be written costs a measurement, never an error."""
    calls = []

    def fake_measure(key):
        calls.append(key)
        return _probe(150.0 + len(calls), key=key)

    first = matmul_probe.cached(KEY, directory=tmp_path, measure_fn=fake_measure)
    path = tmp_path / KEY.file_name()
    assert len(calls) == 1 and path.is_file() and json.loads(path.read_text())["key"]["cpu"] == KEY.cpu
    assert matmul_probe.cached(KEY, directory=tmp_path, measure_fn=fake_measure) == first and len(calls) == 1

    stored = json.loads(path.read_text())
    for bad in ("{not json", json.dumps({**stored, "key": {**stored["key"], "cpu": "Another CPU"}}),
                json.dumps({**stored, "bfloat16_gflops": -1.0}), json.dumps({**stored, "key": None}),
                json.dumps([1, 2]), ""):
        path.write_text(bad)
        before = len(calls)
        again = matmul_probe.cached(KEY, directory=tmp_path, measure_fn=fake_measure)
        assert len(calls) == before + 1 and again.bfloat16_gflops == 150.0 + len(calls), bad
        assert matmul_probe.cached(KEY, directory=tmp_path, measure_fn=fake_measure) == again  # rewritten

    avx2 = dataclasses.replace(KEY, xla_flags="--xla_cpu_max_isa=AVX2")
    assert avx2.file_name() != KEY.file_name()
    other = matmul_probe.cached(avx2, directory=tmp_path, measure_fn=fake_measure)
    assert calls[-1] == avx2 and other.key == avx2 and (tmp_path / avx2.file_name()).is_file()
    n = len(calls)
    assert matmul_probe.cached(KEY, directory=tmp_path, measure_fn=fake_measure).key == KEY and len(calls) == n

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert matmul_probe.cached(KEY, directory=blocked, measure_fn=fake_measure).key == KEY and len(calls) == n + 1


def test_the_cache_folder_and_the_key(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert matmul_probe.cache_dir() == tmp_path / "ssdkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert str(matmul_probe.cache_dir()).endswith(".cache/ssdkit")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
    key = ProbeKey.current()
    assert key.xla_flags == "--xla_cpu_max_isa=AVX2" and key.jax == jax.__version__ and key.cpu


def test_the_real_probe_runs_in_under_two_seconds():
    """The real measurement, compilation included, on whatever CPU runs the suite (it may be busy: the bound
    is generous next to the ~0.6 s it takes on 2 busy AVX2 cores, and far below what the full shapes at
    several repeats would take); and a probe started while a program is traced still measures eagerly."""
    jax.block_until_ready(jnp.ones(1) + 1)  # jax's own start-up is not the probe's
    t = time.perf_counter()
    result = matmul_probe.measure()
    seconds = time.perf_counter() - t
    assert seconds < 2.0, f"the probe took {seconds:.2f} s"
    assert result.key == ProbeKey.current() and result.float32_gflops > 0 and result.bfloat16_gflops > 0
    assert result.faster in (BF16, F32)

    seen = []

    @jax.jit
    def traced(x):
        seen.append(matmul_probe.measure(shapes=((8, 8, 8),), repeats=1))
        return x + 1

    traced(jnp.zeros(()))
    assert seen[0].float32_gflops > 0


def test_the_compute_dtype_is_recorded_by_segment_and_never_refuses_a_resume():
    """``ssdkit train``: ``--compute-dtype`` (default auto) is a how-it-runs setting, left out of the settings a
    resumed run must repeat; the checkpoint and training.json record what each segment ran in."""
    cfg = training.TrainRunConfig(data="corpus.txt")
    assert cfg.compute_dtype == "auto" and "compute_dtype" not in training._settings(cfg)
    f32 = training.ComputeDtype("auto", "float32", "float32", "probe")
    bf16 = training.ComputeDtype("auto", "bfloat16", "bfloat16", "probe")
    first = training._compute_segments([], 0, f32)
    assert first == [{"from_step": 0, "setting": "auto", "weights": "float32", "products": "float32"}]
    assert training._compute_segments(first, 40, f32) == first  # resumed the same way: one segment
    both = training._compute_segments(first, 40, bf16)
    assert both == [*first, {"from_step": 40, "setting": "auto", "weights": "bfloat16", "products": "bfloat16"}]
    assert training._compute_segments(both, 30, f32) == first  # resumed before the change: the later one dropped
    assert training._last_compute_dtype({"compute": both}) == "bfloat16"
    assert training._last_compute_dtype({"settings": {"compute_dtype": "bfloat16"}}) == "bfloat16"  # older record
    assert "bfloat16 weights, float32 products" in training.ComputeDtype("bfloat16", "bfloat16", "float32",
                                                                         "probe").describe()

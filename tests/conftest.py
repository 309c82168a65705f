"""Shared test configuration: hypothesis profiles, PRNG fixtures."""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# Compilation dominates these tests' run time: keep hypothesis example counts modest and deadlines off.
#
# The default profile is derandomised: a plain `pytest -q` draws the same examples on every run and every
# machine, so a newcomer never gets a random red. `HYPOTHESIS_PROFILE=explore` opts into fresh random
# draws (developers hunting for new failures); `thorough` is the same with many more examples.
settings.register_profile(
    "default",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", parent=settings.get_profile("default"))
settings.register_profile("explore", parent=settings.get_profile("default"), derandomize=False)
settings.register_profile("thorough", parent=settings.get_profile("explore"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Half-precision products (ssdkit.matmul_probe): the suite pins them to float32 on every machine, so that what
# it computes does not depend on which CPU runs it (a probe, an AVX-512-BF16 CPU choosing bfloat16) and
# nothing probes or writes to ~/.cache. tests/test_matmul_probe.py tests the probe and the other settings;
# subprocesses inherit the pin.
os.environ["SSDKIT_HALF_MATMUL"] = "float32"

# Compilation is most of the suite's time, and tests (and the two xdist workers) compile many identical
# programs through fresh closures: a persistent XLA cache shared by the run's processes compiles each
# once. One directory per run (the xdist controller's pid), removed when the run ends: a run never
# reads another's.
_RUN = os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()
_XLA_CACHE = os.path.join(tempfile.gettempdir(), f"ssdkit-tests-xla-{_RUN}")
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a plain run) cleans up
        shutil.rmtree(_XLA_CACHE, ignore_errors=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def key() -> jax.Array:
    return jax.random.key(0)


#: Tests that run subprocesses of their own for tens of seconds (each the suite's longest): collected first,
#: so that xdist hands them out first and the workers' last tests are short ones (they finish together).
_LONGEST_FIRST = ("tests/test_sharding.py::test_sharded_programs", "tests/test_sharding.py::test_scan_and_conv",
                  "tests/test_sharding.py::test_two_processes")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONGEST_FIRST))  # stable: the rest keep their order

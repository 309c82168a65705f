"""Compiler options ssdkit passes per backend (ssdkit/xla_options.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdkit import xla_options


@pytest.mark.compiled
def test_cpu_training_keeps_ynnpack_to_matrix_products(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = xla_options.training_compiler_options("cpu")
    # this jaxlib knows the option (a jaxlib that does not gets {}, checked by compiling with it)
    assert options == dict(xla_options.CPU_TRAINING)
    # a column sum (what a backward pass does for every norm scale, bias and conv tap) is then not a
    # YNNPACK fusion
    fn = jax.jit(lambda x: jnp.sum(x * x, axis=0), compiler_options=options)
    assert "ynn_fusion" not in fn.lower(jnp.ones((64, 32))).compile().as_text()
    assert xla_options.training_compiler_options("gpu") == {}


def test_the_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise")
    assert xla_options.training_compiler_options("cpu") == {}


def test_an_unknown_option_is_dropped():
    assert not xla_options._accepted((("xla_cpu_no_such_option", "1"),), "cpu")


def test_cpu_inference_options_and_the_users_flags(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla_options.inference_compiler_options("cpu") == dict(xla_options.CPU_INFERENCE)
    assert xla_options.inference_compiler_options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    assert xla_options.inference_compiler_options("cpu") == {}


def test_inference_jit_passes_its_options_at_the_top_level_only(monkeypatch):
    """An option this jaxlib rejects shows where the options go: a top-level call compiles with them (and
    fails); the same function called inside another jit is a plain nested jit (JAX takes compiler options
    only at the top level), so it compiles."""
    monkeypatch.setattr(xla_options, "inference_compiler_options", lambda: {"xla_cpu_no_such_option": "1"})
    twice = xla_options.inference_jit(lambda x: 2 * x)
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(jax.jit(lambda v: twice(v) + 1)(x), 2 * x + 1)
    with pytest.raises(Exception, match="xla_cpu_no_such_option"):
        twice(x)
    # attributes are the jitted function's (the decode-programs HLO tests lower through them)
    static = xla_options.inference_jit(lambda x, n: x * n, static_argnames=("n",))
    monkeypatch.setattr(xla_options, "inference_compiler_options", lambda: {})
    assert "multiply" in static.lower(x, n=3).as_text()
    assert static.__name__ == "<lambda>"

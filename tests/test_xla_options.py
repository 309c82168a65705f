"""Compiler options ssdkit passes per backend (ssdkit/xla_options.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssdkit import xla_options


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

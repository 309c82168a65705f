"""DeltaNet and Gated DeltaNet (``ssdkit.models.delta``) as MixerLMs: prefill + decode equal the chunked
forward; the published layers written out token by token (numpy, float64, flash-linear-attention's (K, V)
state) equal MixerLM.forward; ``ssdkit train --arch deltanet|gated-deltanet`` trains.

Tolerances: everything is float64. The chunked scan (a UT solve per chunk by repeated squaring, then a scan
over chunks), the O(1) step and the oracle's loop sum the same terms in different orders; over 27 tokens, two
layers, norms and a 32-wide head the gaps measured are 1e-15 to 5e-14 relative to the largest logit. rtol 1e-10 leaves
four orders of magnitude for summation order and still fails on any real error (a wrong tap, gate or
ordering is O(1e-3) relative or more).
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ssdkit import LMConfig, MixerLM
from ssdkit.models.cli import main
from ssdkit.models.delta import DeltaNet, GatedDeltaNet
from tests.helpers import assert_close, cli_on_the_suite_cache
from tests.test_training_cli import TINY

TINY_CFG = LMConfig(vocab_size=40, d_model=32, n_layer=2, num_heads=2, num_groups=2, head_dim=8, state_dim=8,
                    chunk_size=8, conv_kernel=4)
MODELS = {
    "deltanet": MixerLM(TINY_CFG, DeltaNet()),
    "gated-deltanet": MixerLM(TINY_CFG, GatedDeltaNet()),
    # fla's GVA (num_v_heads = 4 > num_heads = 2: value heads 0, 1 read q/k head 0) and negative eigenvalues
    "gated-deltanet-gva": MixerLM(LMConfig(vocab_size=40, d_model=32, n_layer=2, num_heads=4, num_groups=2,
                                           head_dim=8, state_dim=8, chunk_size=8, conv_kernel=4),
                                  GatedDeltaNet(allow_neg_eigval=True)),
}
LAYERS = ["deltanet", "gated-deltanet"]

# The model's methods are plain functions: jit each once with the model static, so that a test compiles one
# program per shape and model (tests/test_toy_models.py).
FORWARD = jax.jit(MixerLM.forward, static_argnums=0)
PREFILL = jax.jit(MixerLM.prefill, static_argnums=0)
DECODE = jax.jit(MixerLM.decode, static_argnums=0)
SEQ, PREFIX = 27, 10  # the prefix is not a multiple of the chunk (8), nor is the sequence


def _tokens(model, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq)).astype(np.int32)


def _params64(model, seed):
    params = model.init(jax.random.key(seed))  # drawn in float32: its eager ops compile once, not again for x64
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


# DeltaNet by default (the delta rule's rank-one path, three convs); Gated DeltaNet adds a decay and a gate on
# the same path, and its forward is held to the published layer under -m long: long here too.
@pytest.mark.parametrize("name", ["deltanet", pytest.param("gated-deltanet", marks=pytest.mark.long)])
def test_prefill_then_decode_equals_forward(name):
    """Float64: the chunked forward at every position == prefill of a 10-token prefix (a chunk and a bit) + 17
    O(1) decode steps; and the layer's head_axes match its params (MixerLM.param_specs on a model axis of 2)."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 0)
        tokens = _tokens(model, 2, SEQ)
        full = np.asarray(FORWARD(model, params, tokens))
        last, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        assert_close(last, full[:, PREFIX - 1], rtol=1e-10, name="prefill logits")
        for t in range(PREFIX, SEQ):
            out, cache = DECODE(model, params, tokens[:, t], cache)
            assert_close(out, full[:, t], rtol=1e-10, name=f"decode logits at {t}")
    specs = model.param_specs(params, AbstractMesh((1, 1, 2, 1), ("data", "fsdp", "model", "seq")))
    assert specs.layers.mixer.wv == P(None, None, "model") and specs.layers.mixer.wo == P(None, "model", None)
    assert specs.layers.mixer.wq == P(None, None, "model")  # G = H: queries split by head too


# ---------------------------------------------------------------- the published layers, token by token
def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _l2(x):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)  # fla's l2norm, eps 1e-6


def _short_conv(x, w):
    """fla's ShortConvolution (no bias, SiLU) of x (B, T, C) with torch's weight[c, 0, k] = w[k, c]: a causal
    depthwise Conv1d, left-padded with K-1 zeros, tap k reading position t - (K-1) + k."""
    kernel, seq = w.shape[0], x.shape[1]
    padded = np.concatenate([np.zeros((x.shape[0], kernel - 1, x.shape[2])), x], axis=1)
    out = sum(w[k] * padded[:, k:k + seq] for k in range(kernel))
    return _silu(out)


def _published_layer(cfg, lp, h, gated: bool, neg_eigval: bool):
    """fla 0.6.0's DeltaNet / GatedDeltaNet forward on h (B, T, D), float64, its (K, V) state per value head:
    ``H ← α H;  H ← H + β k (v - Hᵀk)ᵀ;  o = Hᵀ q / √K`` (fla's naive_recurrent_gated_delta_rule; α = 1 for
    DeltaNet), value head h reading q/k head h // (HV / H)."""
    batch, seq, _ = h.shape
    nv, nk, dk, dv = cfg.num_heads, cfg.num_groups, cfg.state_dim, cfg.head_dim
    q = _l2(_short_conv(h @ lp.wq, lp.conv_q).reshape(batch, seq, nk, dk))
    k = _l2(_short_conv(h @ lp.wk, lp.conv_k).reshape(batch, seq, nk, dk))
    v = _short_conv(h @ lp.wv, lp.conv_v).reshape(batch, seq, nv, dv)
    beta = _sigmoid(h @ lp.w_beta) * (2.0 if neg_eigval else 1.0)  # (B, T, HV)
    if gated:
        g = -np.exp(lp.A_log) * np.logaddexp(0.0, h @ lp.wa + lp.dt_bias)  # -exp(A_log)·softplus(a + dt_bias)
    else:
        g = np.zeros((batch, seq, nv))
    o = np.zeros((batch, seq, nv, dv))
    for b in range(batch):
        for head in range(nv):
            qk_head = head // (nv // nk)
            state = np.zeros((dk, dv))
            for t in range(seq):
                kt, qt = k[b, t, qk_head], q[b, t, qk_head] * dk**-0.5
                state = np.exp(g[b, t, head]) * state
                delta = beta[b, t, head] * (v[b, t, head] - state.T @ kt)
                state = state + np.outer(kt, delta)
                o[b, t, head] = state.T @ qt
    o = _rms(o, lp.out_norm, cfg.norm_eps)  # per head, weight (V,) shared
    if gated:
        o = o * _silu((h @ lp.wg).reshape(batch, seq, nv, dv))  # FusedRMSNormGated: normalise, then gate
    return o.reshape(batch, seq, nv * dv) @ lp.wo


def _published_lm(model, params, tokens):
    """MixerLM's stack around the published layer: embed, [RMSNorm, layer, residual] per layer, RMSNorm, tied head."""
    cfg, mixer = model.cfg, model.mixer
    res = params.embedding[tokens]
    for i in range(cfg.n_layer):
        lp = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a[i]), params.layers.mixer)
        h = _rms(res, params.layers.norm[i], cfg.norm_eps)
        res = res + _published_layer(cfg, lp, h, isinstance(mixer, GatedDeltaNet), mixer.allow_neg_eigval)
    return _rms(res, params.norm_f, cfg.norm_eps) @ params.embedding.T


@pytest.mark.long
@pytest.mark.parametrize("name", [*LAYERS, "gated-deltanet-gva"])
def test_forward_equals_the_published_layer(name):
    """Float64: MixerLM.forward == the published layer written out token by token in numpy (projections, convs,
    L2 norms, β, the gate, the recurrence loop, the output norm and gate), logits at every position."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 4)
        tokens = _tokens(model, 2, SEQ, seed=4)
        got = np.asarray(FORWARD(model, params, tokens))
    want = _published_lm(model, jax.tree_util.tree_map(np.asarray, params), tokens)
    assert np.max(np.abs(want)) > 1e-3  # not a vanishing comparison
    assert_close(got, want, rtol=1e-10, name=f"{name} logits")


@pytest.mark.long
def test_l2_norm_is_unit_length_in_the_input_dtype():
    import ssdkit

    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    y = ssdkit.l2_norm(x)
    assert y.dtype == np.float32
    assert_close(np.linalg.norm(np.asarray(y, np.float64), axis=-1), np.ones(3), rtol=1e-6, name="norms")
    np.testing.assert_array_equal(np.asarray(ssdkit.l2_norm(np.zeros((2, 4), np.float32))), 0.0)


# ---------------------------------------------------------------- the command line
@pytest.fixture
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


def _corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["state", "space", "delta", "rule", "gate", "key", "value", "query"]
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 30)) + ".\n")
    return folder


@pytest.mark.long
@pytest.mark.parametrize("arch", LAYERS)
def test_delta_layers_train_with_the_same_command(tmp_path, arch, _cli_cache):
    """`ssdkit train --arch deltanet|gated-deltanet`: 3 steps of tests/test_training_cli.py's tiny shape (4
    value heads of 16, one q/k group), a finite held-out loss, the architecture recorded by name and the
    exported weights loading back as the same mixer."""
    from ssdkit.models import archs

    out = tmp_path / arch
    assert main(["train", "--arch", arch, "--data", str(_corpus(tmp_path)), "--out", str(out), *TINY,
                 "--steps", "3", "--eval-every", "3", "--save-every", "3", "--held-out", "0.2"]) == 0
    assert json.loads((out / "model" / "mixer.json").read_text())["arch"] == arch
    run_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(run_log[-1]["held_out_loss"]) and run_log[-1]["loss"] < run_log[0]["loss"] + 1.0
    _, model = archs.load_checkpoint(out / "model")
    assert model.mixer == archs.mixer(arch) and (model.cfg.num_heads, model.cfg.num_groups) == (4, 1)

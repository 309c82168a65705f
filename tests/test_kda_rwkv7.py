"""Kimi Delta Attention and RWKV-7 (``ssdkit.models.delta``) as :class:`ssdkit.MixerLM` layers.

* default: prefill + O(1) decode equals one forward at every position (float64), per layer;
* long: each layer against an independent numpy oracle of the published layer, written out token by token
  on the published (K, V) state (for RWKV-7 the transition and the r_k term: the mapping to ssdkit's
  ``w, u`` and where the term enters); verify + commit; sharding rules; ``ssdkit train --arch kda|rwkv7``.

Tolerances (helpers.assert_close, relative to the largest |expected| logit): rtol 1e-10 in float64. Both
sides compute the same function in another order (the chunked UT-form scan against decode steps or a
sequential numpy loop; XLA's fusions against numpy): rounding is ~1e-16 relative per operation, through a
few hundred operations and two layers ~1e-14 (measured: 1.5e-15 KDA, 2.9e-15 RWKV-7 against the oracle). A
wrong term moves the logits by tens of percent: measured on the oracle, 0.47 for KDA's decay after the delta
step, 0.46 for RWKV-7's w and u swapped, 0.91 for its r_k term inside the GroupNorm, 1.0 without the token
shift, 0.36 for the r_k term on the unadjusted k.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from ssdkit import LMConfig, MixerLM
from ssdkit.models import archs
from ssdkit.models.cli import main
from ssdkit.models.delta import KDA, RWKV7
from tests.helpers import assert_close, cli_on_the_suite_cache
from tests.test_training_cli import TINY

CFG = LMConfig(vocab_size=40, d_model=32, n_layer=2, num_heads=2, head_dim=8, state_dim=8, chunk_size=8,
               conv_kernel=4)
MODELS = {"kda": MixerLM(CFG, KDA()), "rwkv7": MixerLM(CFG, RWKV7())}
NAMES = list(MODELS)
RTOL = 1e-10  # float64; module docstring

# The model's methods jitted once each with the model static: every test below shares these programs (init
# too: run op by op, a mixer's init compiles each random draw on its own, tens of seconds on a busy CPU).
INIT = jax.jit(MixerLM.init, static_argnums=0)
FORWARD = jax.jit(MixerLM.forward, static_argnums=0)
PREFILL = jax.jit(MixerLM.prefill, static_argnums=0)
DECODE = jax.jit(MixerLM.decode, static_argnums=0)
PREFIX, SEQ = 10, 27  # a prefix that is not a multiple of the chunk (8)


def _tokens(model, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq)).astype(np.int32)


def _params64(model, seed, noise=0.0):
    """The model's initialisation in float64, each entry moved by ``noise`` · N(0, 1) (the oracle test: no
    parameter stays a constant vector, so a transposed or misplaced one shows)."""
    params = INIT(model, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) + noise * rng.standard_normal(a.shape),
                                  params)


def _decode_from(model, params, tokens, cache, start):
    logits = []
    for t in range(start, tokens.shape[1]):
        out, cache = DECODE(model, params, tokens[:, t], cache)
        logits.append(np.asarray(out))
    return np.stack(logits, axis=1), cache


# RWKV-7 by default (a general rank-one term with a per-channel decay, two convs, the residual stream itself:
# pre_norm = False); KDA's per-channel decay with the delta rule is the same kernel path: long.
@pytest.mark.parametrize("name", [pytest.param("kda", marks=pytest.mark.long), "rwkv7"])
def test_prefill_then_decode_equals_forward(name):
    """Float64: forward at every position == prefill of 10 tokens (not a multiple of the chunk) + 17 O(1)
    decode steps, through both convs / the three convs and the rank-one scan."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 0)
        tokens = _tokens(model, 2, SEQ)
        full = np.asarray(FORWARD(model, params, tokens))
        last, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        assert_close(last, full[:, PREFIX - 1], rtol=RTOL, name="prefill logits")
        stepped, _ = _decode_from(model, params, tokens, cache, PREFIX)
        for t in range(PREFIX, SEQ):
            assert_close(stepped[:, t - PREFIX], full[:, t], rtol=RTOL, name=f"decode logits at {t}")


# ------------------------------------------------------------------ the published layers, token by token
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    return x * _sigmoid(x)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * w


def _layer_norm(x, w, b, eps, groups=1):
    """torch's LayerNorm (one group) or GroupNorm(groups, d) over the last axis."""
    u = x.reshape(*x.shape[:-1], groups, -1)
    u = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + eps)
    return u.reshape(x.shape) * w + b


def _causal_conv(u, w):
    """Depthwise causal conv from zeros: out[t] = Σ_j w[j] u[t - (K-1) + j]."""
    k, t = w.shape[0], u.shape[1]
    padded = np.concatenate([np.zeros((u.shape[0], k - 1, u.shape[2])), u], axis=1)
    return sum(w[j] * padded[:, j:j + t] for j in range(k))


def _previous(u):
    """The token shift: u[t - 1], zero before the first token."""
    return np.concatenate([np.zeros_like(u[:, :1]), u[:, :-1]], axis=1)


def kda_oracle(cfg, mixer, lp, x):
    """fla's KimiDeltaAttention with naive_recurrent_kda: the (K, V) state decayed first, then the delta step."""
    b, t = x.shape[:2]
    heads, n, p = cfg.num_heads, cfg.state_dim, cfg.head_dim
    l2 = lambda u: u / np.sqrt(np.sum(u**2, -1, keepdims=True) + 1e-6)  # noqa: E731
    q = l2(_silu(_causal_conv(x @ lp.wq, lp.conv_q)).reshape(b, t, heads, n))
    k = l2(_silu(_causal_conv(x @ lp.wk, lp.conv_k)).reshape(b, t, heads, n))
    v = _silu(_causal_conv(x @ lp.wv, lp.conv_v)).reshape(b, t, heads, p)
    g = -np.exp(lp.a_log)[:, None] * np.logaddexp(0.0, (x @ lp.f_down @ lp.f_up + lp.dt_bias).reshape(b, t, heads, n))
    beta = _sigmoid(x @ lp.wb)
    state = np.zeros((b, heads, n, p))  # (K, V)
    o = np.zeros((b, t, heads, p))
    for i in range(t):
        state = state * np.exp(g[:, i])[..., None]
        err = v[:, i] - np.einsum("bhk,bhkv->bhv", k[:, i], state)
        state = state + np.einsum("bhk,bhv->bhkv", beta[:, i, :, None] * k[:, i], err)
        o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i] * n**-0.5, state)
    gate = (x @ lp.g_down @ lp.g_up + lp.g_bias).reshape(b, t, heads, p)
    o = _rms(o, lp.o_norm, mixer.norm_eps) * _sigmoid(gate)
    return o.reshape(b, t, heads * p) @ lp.wo


def rwkv7_oracle(cfg, mixer, lp, h):
    """The RWKV-7 block (BlinkDL's RWKV_Tmix_x070 + RWKV_CMix_x070, fla's RWKV7Block without v_first), the
    state on fla's (K, V) kernel form: H_t = diag(w_t) H + (κ̂ ⊙ a)(-κ̂ᵀ H) + k̃ vᵀ, o_t = H_tᵀ r_t."""
    b, t = h.shape[:2]
    heads, n, p = cfg.num_heads, cfg.state_dim, cfg.head_dim
    eps = mixer.norm_eps
    x = _layer_norm(h, lp.ln1_w, lp.ln1_b, eps)
    xx = _previous(x) - x
    xr, xw, xk, xv, xa, xg = (x + xx * lp.mix[i] for i in range(6))
    r = (xr @ lp.wr).reshape(b, t, heads, n)
    k = (xk @ lp.wk).reshape(b, t, heads, n)
    v = (xv @ lp.wv).reshape(b, t, heads, p)
    w = np.exp(-np.exp(-0.5) * _sigmoid(lp.w0 + np.tanh(xw @ lp.w1) @ lp.w2)).reshape(b, t, heads, n)
    a = _sigmoid(lp.a0 + xa @ lp.a1 @ lp.a2).reshape(b, t, heads, n)
    g = _sigmoid(xg @ lp.g1) @ lp.g2
    kk = k * lp.k_k.reshape(heads, n)
    kk = kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)
    k = k * (1 + (a - 1) * lp.k_a.reshape(heads, n))
    state = np.zeros((b, heads, n, p))  # (K, V)
    o = np.zeros((b, t, heads, p))
    for i in range(t):
        sa = np.einsum("bhk,bhkv->bhv", -kk[:, i], state)
        state = (w[:, i, :, :, None] * state + np.einsum("bhk,bhv->bhkv", kk[:, i] * a[:, i], sa)
                 + np.einsum("bhk,bhv->bhkv", k[:, i], v[:, i]))
        o[:, i] = np.einsum("bhk,bhkv->bhv", r[:, i], state)
    o = _layer_norm(o.reshape(b, t, heads * p), lp.gn_w, lp.gn_b, p * eps, groups=heads)
    o = o + (np.sum(r * k * lp.r_k, -1, keepdims=True) * v).reshape(b, t, heads * p)
    h = h + (o * g) @ lp.wo
    z = _layer_norm(h, lp.ln2_w, lp.ln2_b, eps)
    zk = z + (_previous(z) - z) * lp.ffn_mix
    return h + np.maximum(zk @ lp.ffn_key, 0.0) ** 2 @ lp.ffn_value


def lm_oracle(model, params, tokens):
    """MixerLM's stack around the oracle layers: embedding, [RMSNorm → layer → residual]* (RWKV-7: [block]*),
    final RMSNorm, tied head."""
    cfg, res = model.cfg, params.embedding[tokens]
    for i in range(cfg.n_layer):
        lp = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a[i]), params.layers.mixer)
        if isinstance(model.mixer, RWKV7):
            res = rwkv7_oracle(cfg, model.mixer, lp, res)
        else:
            res = res + kda_oracle(cfg, model.mixer, lp, _rms(res, params.layers.norm[i], cfg.norm_eps))
    return _rms(res, params.norm_f, cfg.norm_eps) @ params.embedding.T


@pytest.mark.long
@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_the_published_layer(name):
    """MixerLM.forward (the chunked rank-one scan, chunks of 8 over 27 tokens) against the published layer
    written out token by token in numpy (float64, parameters moved off their constant initial vectors)."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 4, noise=0.1)
        tokens = _tokens(model, 2, SEQ, seed=4)
        got = np.asarray(FORWARD(model, params, tokens))
    assert_close(got, lm_oracle(model, params, tokens), rtol=RTOL, name=f"{name} logits")


# ------------------------------------------------------------------ what MixerLM gives every mixer
VERIFY = jax.jit(MixerLM.verify, static_argnums=0)
COMMIT = jax.jit(MixerLM.commit, static_argnums=0)


@pytest.mark.long
@pytest.mark.parametrize("name", NAMES)
def test_verify_then_commit_equals_decode(name):
    """Float64: verifying 4 tokens from a prefilled cache gives forward's logits there, and committing 1 and
    3 of them gives the cache that decode steps reach: the state and every conv window."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 2)
        tokens = _tokens(model, 2, SEQ, seed=2)
        full = np.asarray(FORWARD(model, params, tokens))
        _, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        logits, record = VERIFY(model, params, tokens[:, PREFIX:PREFIX + 4], cache)
        assert_close(logits, full[:, PREFIX:PREFIX + 4], rtol=RTOL, name="verify logits")
        committed = COMMIT(model, record, np.asarray([1, 3], np.int32))
        _, one = _decode_from(model, params, tokens[:, :PREFIX + 1], cache, PREFIX)
        _, three = _decode_from(model, params, tokens[:, :PREFIX + 3], cache, PREFIX)
        for row, want in ((0, one), (1, three)):
            assert_close(committed.state[:, row], want.state[:, row], rtol=RTOL, name=f"state, row {row}")
            for got_w, want_w in zip(committed.conv, want.conv, strict=True):
                assert_close(got_w[:, row], want_w[:, row], rtol=RTOL, name=f"conv window, row {row}")


@pytest.mark.long
def test_head_axes_split_the_heads_over_model():
    """param_specs on a (fsdp=2, model=2) mesh puts ``model`` on the axis each array's head_axes names (its
    heads, contiguous), and nowhere else: head_axes is a tree of the params' shape."""
    import dataclasses

    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((1, 2, 2, 1), ("data", "fsdp", "model", "seq"))
    for mixer in (KDA(), RWKV7()):
        model = MixerLM(LMConfig(vocab_size=64, d_model=64, n_layer=2, num_heads=4, head_dim=16, state_dim=16,
                                 chunk_size=8), mixer)
        specs = model.param_specs(jax.eval_shape(model.init, jax.random.key(0)), mesh).layers.mixer
        axes = mixer.head_axes(model.cfg)
        for field in dataclasses.fields(axes):
            axis, spec = getattr(axes, field.name), tuple(getattr(specs, field.name))
            want = [i for i, s in enumerate(spec) if s == "model"]
            assert want == ([] if axis is None else [1 + axis]), (type(mixer).__name__, field.name, spec)


@pytest.fixture
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


def _corpus(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["delta", "rule", "state", "decay", "token", "shift", "kimi", "goose"]
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 30)) + ".\n")
    return folder


@pytest.mark.long
@pytest.mark.parametrize("arch", NAMES)
def test_train_with_the_command(tmp_path, arch, _cli_cache):
    """`ssdkit train --arch kda|rwkv7` on tests/test_training_cli.py's tiny shapes (4 heads of P = 16, N = 8):
    3 steps, a finite held-out loss, and a checkpoint that loads back as the same mixer."""
    out = tmp_path / arch
    assert main(["train", "--arch", arch, "--data", str(_corpus(tmp_path / "docs")), "--out", str(out), *TINY,
                 "--steps", "3", "--eval-every", "3", "--save-every", "3", "--held-out", "0.2"]) == 0
    assert json.loads((out / "model" / "mixer.json").read_text())["arch"] == arch
    run_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(run_log[-1]["held_out_loss"]) and run_log[-1]["loss"] < run_log[0]["loss"] + 1.0
    _, model = archs.load_checkpoint(out / "model")
    assert model.mixer == archs.mixer(arch) and model.cfg.head_dim == 16 and model.cfg.state_dim == 8

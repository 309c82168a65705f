"""The toy recurrences: prefill equals step-by-step decode; the core is generic."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from ssdkit import LMConfig, MixerLM
from ssdkit.models.toy import GLA, Retention
from tests.helpers import assert_close

MODELS = {
    "retention": MixerLM(LMConfig(vocab_size=40, num_heads=4, num_groups=4, chunk_size=8), Retention()),
    "retention-shared-keys": MixerLM(LMConfig(vocab_size=40, num_heads=4, num_groups=1, chunk_size=5),
                                   Retention()),
    "gla": MixerLM(LMConfig(vocab_size=40, num_heads=2, num_groups=2, chunk_size=8, conv_kernel=4), GLA()),
}
# One scalar-decay mixer (4 groups) and the diagonal-decay one with a conv by default; retention with shared
# keys (one group, chunks of 5) runs the same mixer through the core's group handling (test_scan): long.
NAMES = ["gla", "retention", pytest.param("retention-shared-keys", marks=pytest.mark.long)]

# The model's methods are plain functions: jit each once (static model), so that a test compiles one
# program per shape rather than every operation on its own; both tests below share these programs.
FORWARD = jax.jit(MixerLM.forward, static_argnums=0)
PREFILL = jax.jit(MixerLM.prefill, static_argnums=0)
DECODE = jax.jit(MixerLM.decode, static_argnums=0)
PREFIX = 10


def _tokens(model, batch, seq, seed=0):
    return np.random.default_rng(seed).integers(0, model.cfg.vocab_size, (batch, seq)).astype(np.int32)


def _params64(model, seed):
    params = model.init(jax.random.key(seed))  # drawn in float32: its eager ops compile once, not again for x64
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)


def _decode_from(model, params, tokens, cache, start):
    """Logits at positions start.. of ``tokens`` from O(1) decode steps, and the cache after them."""
    logits = []
    for t in range(start, tokens.shape[1]):
        out, cache = DECODE(model, params, tokens[:, t], cache)
        logits.append(np.asarray(out))
    return np.stack(logits, axis=1), cache


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_decode_equals_forward(name):
    """Float64: chunked forward at every position == prefill of a prefix + O(1) decode steps.

    The prefill starts from an explicit empty cache (what prefill makes without one): the program of the
    chunked prefill below, compiled once for both tests."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 0)
        tokens = _tokens(model, 2, 27)
        full = np.asarray(FORWARD(model, params, tokens))
        last, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        assert_close(last, full[:, PREFIX - 1], rtol=1e-10, name="prefill logits")
        stepped, _ = _decode_from(model, params, tokens, cache, PREFIX)
        for t in range(PREFIX, 27):
            assert_close(stepped[:, t - PREFIX], full[:, t], rtol=1e-10, name=f"decode logits at {t}")


@pytest.mark.parametrize("name", NAMES)
def test_chunked_prefill_continues_the_cache(name):
    """A prefill continuing another's cache: its last logits equal forward's, its state the state decode
    reaches over the same tokens from the same cache (float64, the programs of the test above)."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 1)
        tokens = _tokens(model, 2, 2 * PREFIX + 7, seed=1)
        full = np.asarray(FORWARD(model, params, tokens))
        _, c1 = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        last, c2 = PREFILL(model, params, tokens[:, PREFIX:2 * PREFIX], c1)
        _, stepped = _decode_from(model, params, tokens[:, :2 * PREFIX], c1, PREFIX)
        assert_close(last, full[:, 2 * PREFIX - 1], rtol=1e-10, name="logits")
        assert_close(c2.state, stepped.state, rtol=1e-10, name="state")
        assert_close(c2.conv, stepped.conv, rtol=1e-10, name="conv window")


def test_the_default_initialisation_starts_near_chance():
    """LMConfig's default embedding scale is the working one (0.02, as Mamba-2's and `ssdkit train`'s):
    the first loss of a 16-token vocabulary is about ln 16 = 2.77 nats (with 1.0 and a tied head it was
    17.8, and training stalled)."""
    model = MixerLM(LMConfig(vocab_size=16), Retention())
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 16)
    loss, _ = jax.jit(model.loss)(model.init(jax.random.key(0)), tokens)
    assert abs(float(loss) - np.log(16)) < 0.1, float(loss)


# ---------------------------------------------------------------- what MixerLM gives every mixer
VERIFY = jax.jit(MixerLM.verify, static_argnums=0)
COMMIT = jax.jit(MixerLM.commit, static_argnums=0)


@pytest.mark.parametrize("name", NAMES)
def test_verify_then_commit_equals_decode(name):
    """Float64: verifying k = 4 tokens from a prefilled cache gives forward's logits at those positions, and
    committing each row's prefix (1 and 3 tokens; 0 and 4 are ssd_commit's own tests) gives the cache that
    decode steps reach: state and conv window (GLA) or no window (retention). The programs of the tests above,
    plus the verify and the commit."""
    model = MODELS[name]
    with jax.enable_x64(True):
        params = _params64(model, 2)
        tokens = _tokens(model, 2, 27, seed=2)
        full = np.asarray(FORWARD(model, params, tokens))
        _, cache = PREFILL(model, params, tokens[:, :PREFIX], model.init_cache(2, np.float64))
        logits, record = VERIFY(model, params, tokens[:, PREFIX:PREFIX + 4], cache)
        assert_close(logits, full[:, PREFIX:PREFIX + 4], rtol=1e-10, name="verify logits")
        committed = COMMIT(model, record, np.asarray([1, 3], np.int32))
        _, one = _decode_from(model, params, tokens[:, :PREFIX + 1], cache, PREFIX)
        _, three = _decode_from(model, params, tokens[:, :PREFIX + 3], cache, PREFIX)
        for row, want in ((0, one), (1, three)):
            assert_close(committed.state[:, row], want.state[:, row], rtol=1e-10, name=f"state, row {row}")
            for got_w, want_w in zip(jax.tree_util.tree_leaves(committed.conv), jax.tree_util.tree_leaves(want.conv),
                                     strict=True):
                assert_close(got_w[:, row], want_w[:, row], rtol=1e-10, name=f"conv window, row {row}")


def test_ragged_prefill_holds_each_row_at_its_length():
    """Prefill with lengths (right padding): row 1's logits are those after its 7th token and its cache the
    one 7 decode steps reach; the padding leaves it alone (float64, GLA: a conv window and a state)."""
    model = MODELS["gla"]
    with jax.enable_x64(True):
        params = _params64(model, 3)
        tokens = _tokens(model, 2, PREFIX, seed=3)
        last, cache = jax.jit(MixerLM.prefill, static_argnums=0)(model, params, tokens, None,
                                                                 np.asarray([PREFIX, 7], np.int32))
        stepped, want = _decode_from(model, params, tokens[:, :7], model.init_cache(2, np.float64), 0)
        assert_close(last[1], stepped[1, 6], rtol=1e-10, name="row 1's last logits")
        assert_close(cache.state[:, 1], want.state[:, 1], rtol=1e-10, name="row 1's state")
        assert_close(cache.conv[:, 1], want.conv[:, 1], rtol=1e-10, name="row 1's conv window")


class _TwoScans:
    """A mixer that breaks the protocol by running its recurrence twice."""

    def __init__(self, inner):
        self.inner = inner

    def __hash__(self):
        return 0

    def recurrence(self, cfg):
        return self.inner.recurrence(cfg)

    def conv_channels(self, cfg):
        return self.inner.conv_channels(cfg)

    def init_layer(self, cfg, key):
        return self.inner.init_layer(cfg, key)

    def __call__(self, cfg, lp, h, ops):
        return self.inner(cfg, lp, h, ops) + self.inner(cfg, lp, h, ops)


def test_a_mixer_that_breaks_the_protocol_is_named():
    cfg = LMConfig(vocab_size=8, n_layer=1, chunk_size=8)
    with pytest.raises(TypeError, match="Retention.*not a mixer.*hashable"):
        method = lambda *a: None  # noqa: E731
        MixerLM(cfg, type("Retention", (), {"recurrence": method, "conv_channels": method, "init_layer": method,
                                             "__call__": method, "__hash__": None})())
    with pytest.raises(TypeError, match="lacks conv_channels, init_layer"):
        MixerLM(cfg, type("Half", (), {"recurrence": lambda self, c: None, "__call__": lambda *a: None})())
    model = MixerLM(cfg, _TwoScans(Retention()))
    with pytest.raises(ValueError, match="called ops.scan twice"):
        model.forward(model.init(jax.random.key(0)), np.zeros((1, 3), np.int32))
    model = MixerLM(cfg, _TwoScans(GLA()))
    with pytest.raises(ValueError, match="called ops.conv 2 times, but its conv_channels 32 declares 1"):
        model.forward(model.init(jax.random.key(0)), np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="token id 8 is out of range for the vocabulary of 8"):
        MixerLM(cfg, GLA()).forward(model.init(jax.random.key(0)), np.full((1, 3), 8, np.int32))


def test_param_specs_split_declared_head_axes_and_fsdp_the_rest():
    """MixerLM.param_specs on a (fsdp=2, model=2) mesh: GLA's head axes over model (its head_axes), the
    largest other axis over fsdp where big enough; retention declares its own; norms replicated."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    mesh = AbstractMesh((1, 2, 2, 1), ("data", "fsdp", "model", "seq"))
    model = MixerLM(LMConfig(vocab_size=1024, d_model=256, n_layer=2, num_heads=4, head_dim=64, state_dim=16,
                             chunk_size=8), GLA())
    params = jax.eval_shape(model.init, jax.random.key(0))
    specs = model.param_specs(params, mesh)
    assert specs.embedding == P("fsdp", None) and specs.norm_f == P() and specs.layers.norm == P()
    assert specs.layers.mixer.wv == P(None, "fsdp", "model")  # (L, d_model, H·P): heads on model
    assert specs.layers.mixer.wo == P(None, "model", "fsdp")  # (L, H·P, d_model)
    assert specs.layers.mixer.wq == P(None, None, None)  # (L, 256, 16): too small to split, per group
    with pytest.raises(ValueError, match="'model' axis of 3 devices does not divide the 4 heads of GLA"):
        model.check_mesh(AbstractMesh((1, 1, 3, 1), ("data", "fsdp", "model", "seq")))

"""The generic training step (ssdkit.training.step): accumulation, non-finite skips, mixed precision, remat,
the optimiser defaults, and that it trains Mamba-2 and the toy recurrences through one code path."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssdkit.models import mamba2
from ssdkit.models.toy import gla, retention
from ssdkit.models.toy.lm import ToyConfig, ToyLM
from ssdkit.training.step import TrainState, adamw, decay_mask, make_train_step, warmup_cosine
from tests.helpers import assert_close

CFG = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=40, d_state=8, headdim=16, chunk_size=8)


def _tokens(batch, seq, seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    """4 micro-batches of 1 row = one batch of 4 (token-weighted; rows carry different token counts)."""
    params = mamba2.init_params(CFG, jax.random.key(0))
    tokens = _tokens(4, 13)
    mask = jnp.asarray(np.random.default_rng(1).random((4, 13)) < 0.7)
    loss_fn = lambda p, b: mamba2.loss(p, CFG, b[0], loss_mask=b[1])  # noqa: E731
    sgd = optax.sgd(1.0)  # the new params are params - gradient: compares gradients directly
    full_state, full = make_train_step(loss_fn, sgd)(TrainState.create(params, sgd), (tokens, mask))
    params = mamba2.init_params(CFG, jax.random.key(0))  # the step donated the first copy
    micro_state, micro = make_train_step(loss_fn, sgd, micro_batches=4)(TrainState.create(params, sgd),
                                                                         (tokens, mask))
    # Two programs summing the same float32 terms in another order: rounding of the gradients.
    assert_close(micro.loss, full.loss, rtol=1e-6, name="loss")
    assert float(micro.tokens) == float(full.tokens) == float(jnp.sum(mask[:, 1:]))
    for a, b in zip(jax.tree_util.tree_leaves(micro_state.params), jax.tree_util.tree_leaves(full_state.params),
                    strict=True):
        assert_close(a, b, rtol=1e-5, name="params after one SGD step")
    with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
        make_train_step(loss_fn, sgd, micro_batches=3)(micro_state, (tokens, mask))


def test_non_finite_loss_skips_the_update_and_is_counted():
    params = mamba2.init_params(CFG, jax.random.key(0))
    opt = adamw(1e-2)

    def loss_fn(p, batch):
        tokens, poison = batch
        loss, m = mamba2.loss(p, CFG, tokens)
        return loss * poison, dataclasses.replace(m, loss=m.loss * poison)

    step = make_train_step(loss_fn, opt)
    state = TrainState.create(params, opt)
    before = jax.tree_util.tree_map(np.asarray, state)
    state, m = step(state, (_tokens(2, 9), jnp.float32(jnp.nan)))
    assert not bool(m.finite) and int(state.skipped) == 1 and int(state.step) == 1
    # Exact: a skipped step writes back the very same values (a select, no arithmetic).
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, before.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.opt_state, before.opt_state)
    state, m = step(state, (_tokens(2, 9), jnp.float32(1.0)))
    assert bool(m.finite) and int(state.skipped) == 1
    assert not np.array_equal(state.params.norm_f, before.params.norm_f) or not np.array_equal(
        state.params.layers[0].in_proj_heads, before.params.layers[0].in_proj_heads)


def test_remat_policies_give_the_same_gradient():
    cfg2 = dataclasses.replace(CFG, n_layer=2)  # remat acts per layer: two of them
    params = mamba2.init_params(cfg2, jax.random.key(2), stacked=True)  # the layout remat saves memory in
    tokens = _tokens(2, 17, seed=3)
    grad = lambda r: jax.jit(jax.grad(lambda p: mamba2.loss(p, cfg2, tokens, remat=r)[0]))(params)  # noqa: E731
    reference = jax.tree_util.tree_leaves(grad("none"))
    for remat in ("layer", "matmuls"):
        for a, b in zip(jax.tree_util.tree_leaves(grad(remat)), reference, strict=True):
            assert_close(a, b, rtol=1e-5, name=f"grad with remat={remat}")  # recomputation: another program
    with pytest.raises(ValueError, match="remat must be one of"):
        mamba2.loss(params, cfg2, tokens, remat="everything")


def test_bfloat16_compute_keeps_float32_master_weights():
    params = mamba2.init_params(CFG, jax.random.key(0))
    opt = adamw(1e-3)
    seen = []

    def loss_fn(p, tokens):
        seen.append((p.layers[0].in_proj_heads.dtype, p.layers[0].A_log.dtype, p.norm_f.dtype))
        return mamba2.loss(p, CFG, tokens)

    step = make_train_step(loss_fn, opt, compute_dtype=jnp.bfloat16)
    state, m = step(TrainState.create(params, opt), _tokens(2, 9))
    assert seen[0] == (jnp.bfloat16, jnp.float32, jnp.float32)  # matrices only
    assert bool(m.finite)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state.params))


def test_decay_mask_follows_mamba_ssm():
    for stacked in (False, True):
        params = mamba2.init_params(dataclasses.replace(CFG, tie_embeddings=False), jax.random.key(0),
                                    stacked=stacked)
        mask = decay_mask(params)
        layer = mask.layers if stacked else mask.layers[0]
        assert all((layer.in_proj_heads, layer.in_proj_dt, layer.in_proj_groups, layer.out_proj, layer.conv_x_weight,
                    layer.conv_bc_weight))
        assert not any((layer.norm, layer.gate_norm, layer.conv_x_bias, layer.conv_bc_bias, layer.A_log,
                        layer.dt_bias, layer.D))
        assert (mask.embedding, mask.norm_f, mask.lm_head) == (False, False, True)


def test_warmup_cosine_schedule():
    sched = warmup_cosine(1e-3, warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(5e-4)
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(60)) == pytest.approx(0.55e-3)  # half way down the cosine
    assert float(sched(110)) == pytest.approx(1e-4) == float(sched(500))
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        warmup_cosine(1e-3, warmup_steps=20, total_steps=10)


def _train(loss_fn, params, batches, lr=3e-3):
    opt = adamw(lr, total_steps=len(batches), warmup_steps=2, weight_decay=0.0)
    step = make_train_step(loss_fn, opt)
    state, losses = TrainState.create(params, opt), []
    for b in batches:
        state, m = step(state, b)
        losses.append(float(m.loss))
    return state, losses


# The toys (and a user-defined recurrence) also train through the step in docs/training.md, executed by
# the suite; their own runs here are long cases.
@pytest.mark.parametrize("model", ["mamba2", pytest.param("retention", marks=pytest.mark.long),
                                   pytest.param("gla", marks=pytest.mark.long)])
def test_one_step_function_trains_every_model(model):
    """A task learnable from the previous token (t_{i+1} = t_i + 3 mod V, random starts) through the same
    step: the loss falls from chance to a fraction of it for Mamba-2 and for the toy recurrences."""
    vocab = 16
    rng = np.random.default_rng(0)
    batches = [jnp.asarray((rng.integers(0, vocab, (8, 1)) + 3 * np.arange(12)) % vocab, jnp.int32)
               for _ in range(40)]
    if model == "mamba2":
        cfg = dataclasses.replace(CFG, vocab_size=vocab)
        params = mamba2.init_params(cfg, jax.random.key(0))
        loss_fn = functools.partial(lambda p, t, cfg: mamba2.loss(p, cfg, t), cfg=cfg)
    else:
        mixer = retention.Retention() if model == "retention" else gla.GLA()
        lm = ToyLM(ToyConfig(vocab_size=vocab), mixer)
        params = lm.init(jax.random.key(0))
        loss_fn = lm.loss
    _, losses = _train(loss_fn, params, batches, lr=1e-2)
    assert losses[0] > 0.8 * np.log(vocab)  # starts near chance
    assert np.mean(losses[-5:]) < 0.3 * np.log(vocab), losses

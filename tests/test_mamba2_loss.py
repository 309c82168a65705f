"""The Mamba-2 training loss: blockwise LM head + cross-entropy against the full-logits oracle, packing,
masks; gradient parity with PyTorch lives in test_mamba2_parity.py."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssdkit
from ssdkit.models import mamba2
from tests.helpers import assert_close

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)


def _params(cfg=CFG, seed=0, tie=True):
    cfg = dataclasses.replace(cfg, tie_embeddings=tie)
    params = mamba2.init_params(cfg, jax.random.key(seed))
    return dataclasses.replace(params, embedding=params.embedding * 30), cfg  # larger, varied logits


def _tokens(batch, seq, seed=0, cfg=CFG):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


# The loss as one compiled program per configuration (eager, every op would compile on its own).
LOSS = jax.jit(mamba2.loss, static_argnames=("cfg", "block_size"))


def _oracle(params, cfg, tokens, weights):
    """Cross-entropy from the full (batch, seq, vocab) logits of ``forward``, in float64 on the host."""
    logits = np.asarray(mamba2.forward(params, cfg, tokens), np.float64)[:, :-1]
    t = np.asarray(tokens)[:, 1:]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - np.take_along_axis(logits, t[..., None], -1)[..., 0]
    correct = (logits.argmax(-1) == t).astype(np.float64)
    w = np.asarray(weights, np.float64)
    return (nll * w).sum() / w.sum(), (correct * w).sum() / w.sum(), w.sum()


# The blockwise loss and forward + host log-softmax are two programs summing the same float32 terms in a
# different order: per-token NLLs of O(1..10) agree to ~1e-6 relative, and their mean as well.
LOSS_RTOL = 1e-5


# The untied head in one block (256 > 18 targets) by default; the tied head's loss is compared below
# (test_loss_mask_and_segment_ids_set_the_weights) and with torch (test_mamba2_parity, "tied"), a ragged last
# block in ssdkit.head_cross_entropy (below): the other pairings are long.
@pytest.mark.parametrize(("block_size", "tie"), [
    (256, False),
    *(pytest.param(b, t, marks=pytest.mark.long) for b, t in [(1, True), (1, False), (5, True), (5, False),
                                                              (256, True)]),
])
def test_loss_equals_full_logits_cross_entropy(block_size, tie):
    params, cfg = _params(tie=tie)
    tokens = _tokens(3, 19)  # 18 targets: block 5 leaves a ragged last block
    loss, metrics = LOSS(params, cfg, tokens, block_size=block_size)
    want_loss, want_acc, want_n = _oracle(params, cfg, tokens, np.ones((3, 18)))
    assert isinstance(metrics, ssdkit.LossMetrics)
    assert_close(loss, want_loss, rtol=LOSS_RTOL, name="loss")
    assert float(metrics.loss) == float(loss)
    assert float(metrics.tokens) == want_n == 54
    # accuracy: argmax of the same logits up to rounding (embeddings x30: top-2 gaps far above rounding),
    # divided in float32
    assert float(metrics.accuracy) == pytest.approx(want_acc, rel=1e-6)
    assert 0 < want_acc < 1  # a real check: some right, some wrong


def test_loss_mask_and_segment_ids_set_the_weights():
    params, cfg = _params()
    tokens = _tokens(3, 19, seed=1)  # the shape of the test above: forward is compiled once for both
    mask = np.ones((3, 19), bool)
    mask[0, :5] = False  # a prompt that is not trained on
    mask[1, 9:] = False
    seg = np.zeros((3, 19), np.int32)
    seg[1, 6:] = 1
    _, metrics = LOSS(params, cfg, tokens, loss_mask=mask)
    want, _, n = _oracle(params, cfg, tokens, mask[:, 1:])
    assert_close(metrics.loss, want, rtol=LOSS_RTOL, name="masked loss")
    assert float(metrics.tokens) == n == 14 + 8 + 18
    targets, weights = ssdkit.next_token_targets(tokens, segment_ids=seg, loss_mask=mask)
    np.testing.assert_array_equal(targets, np.asarray(tokens)[:, 1:])
    expected = mask[:, 1:].astype(np.float32)
    expected[1, 5] = 0  # position 5 would predict the second document's first token
    np.testing.assert_array_equal(weights, expected)


def test_packed_row_equals_documents_alone():
    """Packing: the loss of a packed row is the token-weighted mean of each document's loss run alone,
    and so is its gradient (state and conv window reset at each document start).

    Both sides are batches of 3 rows of 24 with segment ids and a loss mask, so one compiled program (the
    loss and its gradient) computes both. Packed: row 0 holds the three documents (one id each), the other
    rows weigh nothing. Alone: each document in its own row from an empty state (one id), right-padded with
    a zero loss mask: the padding comes after the document (causal: its outputs do not change), its
    targets weigh 0, and the masked mean over the batch is the token-weighted mean."""
    params, cfg = _params(dataclasses.replace(CFG, n_layer=1), seed=2)  # one layer: resets are per layer
    lengths = [7, 11, 6]  # 11 is not a multiple of the chunk (8), 7 + 11 crosses a chunk boundary
    docs = [_tokens(1, n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = sum(lengths)
    packed = np.zeros((3, width), np.int32)
    packed_seg = np.zeros((3, width), np.int32)
    packed_mask = np.zeros((3, width), bool)
    packed[0], packed_seg[0], packed_mask[0] = np.concatenate(docs), np.repeat(np.arange(3), lengths), True
    alone = np.zeros((3, width), np.int32)
    alone_mask = np.zeros((3, width), bool)
    for i, d in enumerate(docs):
        alone[i, :len(d)], alone_mask[i, :len(d)] = d, True

    @jax.jit
    def loss_and_grad(p, tokens, segment_ids, loss_mask):
        return jax.value_and_grad(lambda q: mamba2.loss(q, cfg, tokens, segment_ids=segment_ids,
                                                        loss_mask=loss_mask), has_aux=True)(p)

    (loss_p, metrics_p), grad_p = loss_and_grad(params, packed, packed_seg, packed_mask)
    (loss_a, metrics_a), grad_a = loss_and_grad(params, alone, np.zeros_like(packed_seg), alone_mask)
    assert float(metrics_p.tokens) == float(metrics_a.tokens) == sum(n - 1 for n in lengths)
    # Two computations over the same float32 terms (packed scan vs three short ones): rounding, 1e-5 as in the
    # issue.
    assert_close(loss_p, loss_a, rtol=1e-5, name="loss")
    for (path, gp), ga in zip(jax.tree_util.tree_leaves_with_path(grad_p), jax.tree_util.tree_leaves(grad_a),
                              strict=True):
        assert_close(gp, ga, rtol=1e-5, name=f"grad {jax.tree_util.keystr(path)}")


def test_loss_rejects_bad_input():
    params, cfg = _params()
    with pytest.raises(ValueError, match="at least 2 positions"):
        mamba2.loss(params, cfg, jnp.zeros((2, 1), jnp.int32))
    with pytest.raises(ValueError, match="out of range"):
        mamba2.loss(params, cfg, jnp.full((1, 4), 999, jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must have the tokens' shape"):
        mamba2.loss(params, cfg, _tokens(2, 4), segment_ids=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be an integer array"):
        mamba2.loss(params, cfg, _tokens(2, 4), segment_ids=jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="loss_mask must have the tokens' shape"):
        mamba2.loss(params, cfg, _tokens(2, 4), loss_mask=jnp.ones((2, 5), bool))


@pytest.mark.compiled
def test_blockwise_head_never_builds_the_full_logits():
    """Structural: the compiled loss and its gradient hold at most one block of logits at a time."""
    cfg = dataclasses.replace(CFG, vocab_size=4000, n_layer=1)  # the head is the subject: one layer
    params = jax.eval_shape(lambda k: mamba2.init_params(cfg, k), jax.random.key(0))  # compiled, never run
    tokens = _tokens(2, 129, cfg=cfg)

    def grad_fn(p):
        return jax.grad(lambda q: mamba2.loss(q, cfg, tokens, block_size=16)[0])(p)

    lowered = jax.jit(grad_fn).lower(params)
    hlo = lowered.compile().as_text()
    vocab = cfg.padded_vocab_size
    assert f"f32[2,16,{vocab}]" in hlo  # one block's logits
    assert f"f32[2,128,{vocab}]" not in hlo and f"f32[2,129,{vocab}]" not in hlo  # never the whole sequence
    # the gradient is formed with the logits: three products with the vocabulary per block (logits,
    # d/dhidden, d/dhead), not four (a rematerialised block computes its logits twice)
    vocab_dots = [line for line in lowered.as_text().splitlines()
                  if "stablehlo.dot_general" in line and f"x{vocab}x" in line]
    assert len(vocab_dots) == 3, vocab_dots


# The head's gradient is formed in its forward pass (a custom VJP); the oracle is the textbook gradient of
# Σ w·nll on the host in float64. float32 products over dim 24 / vocab 50 agree with it to ~1e-6 relative;
# 1e-5 leaves an order of magnitude for summation order and is far below a wrong term (O(1)).
HEAD_GRAD_RTOL = 1e-5


# Blocks of 4 over 9 positions: a ragged last block. One-position blocks and one block (64 > 9): long.
@pytest.mark.parametrize("block_size", [pytest.param(1, marks=pytest.mark.long), 4,
                                        pytest.param(64, marks=pytest.mark.long)])
def test_head_gradient_formed_in_the_forward_pass_equals_the_textbook_gradient(block_size):
    rng = np.random.default_rng(3)
    batch, seq, dim, vocab = 2, 9, 24, 50
    hidden = jnp.asarray(rng.normal(size=(batch, seq, dim)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(vocab, dim)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 2, (batch, seq)) * (rng.uniform(size=(batch, seq)) > 0.2), jnp.float32)
    scale = 2.5  # a cotangent other than 1 must scale every gradient

    def f(h, w, wt):
        return scale * ssdkit.head_cross_entropy(h, w, targets, wt, block_size=block_size).nll

    got = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(hidden, head, weights)
    h64, w64, t, wt = (np.asarray(a, np.float64) for a in (hidden, head, targets, weights))
    z = h64 @ w64.T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    nll = -np.log(np.take_along_axis(p, t.astype(int)[..., None], -1)[..., 0])
    dz = scale * wt[..., None] * (p - np.eye(vocab)[t.astype(int)])
    for name, g, want in [("hidden", got[0], dz @ w64), ("head", got[1], np.einsum("bsv,bsd->vd", dz, h64)),
                          ("weights", got[2], scale * nll)]:
        assert_close(g, want, rtol=HEAD_GRAD_RTOL, atol=1e-6, name=f"d/d{name}")
    # without differentiation the same sums come from the logits product alone
    sums = jax.jit(lambda h: ssdkit.head_cross_entropy(h, head, targets, weights, block_size=block_size))(hidden)
    assert_close(sums.nll, (wt * nll).sum(), rtol=HEAD_GRAD_RTOL, name="nll")
    assert_close(sums.correct, (wt * (z.argmax(-1) == t)).sum(), rtol=1e-6, name="correct")


def test_head_gradient_keeps_the_input_dtypes():
    """bfloat16 head (bfloat16 compute): the gradients come back in each input's dtype, finite."""
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(30, 16)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 30, (2, 7)), jnp.int32)
    weights = jnp.ones((2, 7), jnp.float32)
    dh, dw = jax.jit(jax.grad(lambda h, w: ssdkit.head_cross_entropy(h, w, targets, weights, block_size=3).nll,
                              argnums=(0, 1)))(hidden, head)
    assert dh.dtype == jnp.float32 and dw.dtype == jnp.bfloat16
    want = jax.jit(jax.grad(lambda h: ssdkit.head_cross_entropy(h, head.astype(jnp.float32), targets,
                                                                weights).nll))(hidden)
    # the bfloat16 head rounds the logits' inputs (8 bits of mantissa): 2e-2 relative
    assert_close(dh, want, rtol=2e-2, atol=2e-2, name="d/dhidden (bfloat16 head)")

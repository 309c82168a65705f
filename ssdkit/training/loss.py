"""Next-token cross-entropy over a language-model head, one sequence block at a time.

A (batch, seq, vocab) float32 logits tensor is the largest array of LM training (130M at batch 8 x 2,048
tokens with a 50k vocabulary: 3.3 GB, and as much again for its gradient). :func:`head_cross_entropy`
never builds it: the head's matrix product, the log-softmax and the target pick run over blocks of
``block_size`` positions inside a ``lax.scan``, so a pass holds one block's logits,
(batch, block_size, vocab), at a time.

For position t with logits ``z = h_t · Wᵀ`` (float32) and target y::

    nll_t = logsumexp(z) - z[y]        correct_t = [z[y] = max z]

summed with weights ``w_t`` (0 for padding, document boundaries, masked tokens).

**The gradient is computed in the forward pass** (a ``jax.custom_vjp``): with ``p = softmax(z)``,
``∂nll_t/∂z = p - onehot(y)``, so while a block's logits are at hand the block also computes
``dz = w_t (p - onehot(y))``, ``∂/∂h = dz · W`` and adds ``dzᵀ · h`` to ``∂/∂W``. The backward pass only
scales these by the incoming cotangent. The head then costs three matrix products per block (logits and
the two gradients) where a rematerialised block costs four (its logits twice), and no logits are stored
between the passes. Without differentiation only the logits product runs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from ssdkit._typing import SegmentIds, Tokens
from ssdkit.dtypes import check_integer, sequence_matmul_dtype

Scalar = Float[Array, ""]
Targets = Int[Array, "batch seq"]
Weights = Float[Array, "batch seq"]
Hidden = Float[Array, "batch seq dim"]
HeadWeight = Float[Array, "vocab dim"]

#: Positions per block of :func:`head_cross_entropy`: a block's float32 logits are batch·256·vocab·4
#: bytes (8 rows x 50k vocab: 410 MB), and 256 rows keep the head's matrix product efficient.
DEFAULT_BLOCK_SIZE = 256


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CrossEntropySums:
    """Weighted sums over target positions (float32 scalars)."""

    nll: Scalar  # Σ w_t · (logsumexp(z_t) - z_t[y_t])
    correct: Scalar  # Σ w_t · [z_t[y_t] = max z_t] (the target is an argmax; a tie for the maximum counts)
    weight: Scalar  # Σ w_t, the number of target tokens when weights are 0/1

    def metrics(self) -> LossMetrics:
        """The token-weighted means (0 where no token carries weight)."""
        denom = jnp.maximum(self.weight, jnp.finfo(jnp.float32).tiny)
        return LossMetrics(loss=self.nll / denom, accuracy=self.correct / denom, tokens=self.weight)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossMetrics:
    """What a training or evaluation step reports (float32 scalars)."""

    loss: Scalar  # token-weighted mean cross-entropy, nats per token
    accuracy: Scalar  # token-weighted fraction of targets that are the argmax prediction
    tokens: Scalar  # the number of target tokens (the sum of their weights)


def next_token_targets(
    tokens: Tokens, *, segment_ids: SegmentIds | None = None, loss_mask=None
) -> tuple[Targets, Weights]:
    """Targets and weights for predicting ``tokens[:, t + 1]`` from position t: (batch, seq - 1) each.

    A position gets weight 0 when its target starts a new document (``segment_ids`` changes between t
    and t + 1: nothing before a document predicts its first token) or when ``loss_mask[:, t + 1]`` is
    False / 0 (``loss_mask`` (batch, seq), bool or float weights, says which tokens count as targets).
    """
    check_integer("tokens", tokens)
    if np.ndim(tokens) != 2:
        raise ValueError(f"tokens must have shape (batch, seq), got {np.shape(tokens)}")
    weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
    if segment_ids is not None:
        check_integer("segment_ids", segment_ids)
        if np.shape(segment_ids) != np.shape(tokens):
            raise ValueError(f"segment_ids must have the tokens' shape {np.shape(tokens)}, got {np.shape(segment_ids)}")
        weights = weights * (segment_ids[:, 1:] == segment_ids[:, :-1])
    if loss_mask is not None:
        if np.shape(loss_mask) != np.shape(tokens):
            raise ValueError(f"loss_mask must have the tokens' shape {np.shape(tokens)}, got {np.shape(loss_mask)}")
        dtype = jnp.result_type(loss_mask)
        if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            raise TypeError(f"loss_mask must be bool or numeric, got dtype {dtype}")
        weights = weights * jnp.asarray(loss_mask)[:, 1:].astype(jnp.float32)
    return tokens[:, 1:], weights


def head_cross_entropy(
    hidden: Hidden,
    head: HeadWeight,
    targets: Targets,
    weights: Weights,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> CrossEntropySums:
    """Σ over positions of the weighted cross-entropy of ``hidden · headᵀ`` against ``targets``.

    Args:
        hidden: (batch, seq, dim) the final (normed) hidden states; cast to the head's dtype for the
            product, accumulated in float32 (a whole block multiplies in
            :func:`ssdkit.sequence_matmul_dtype` of the head's dtype).
        head: (vocab, dim) the LM head (or the tied embedding).
        targets: (batch, seq) integer ids in 0..vocab-1 (any value where the weight is 0).
        weights: (batch, seq) float weights, 0 to ignore a position.
        block_size: positions per block; seq is padded up to a multiple with zero weight.

    Memory: one block's (batch, block_size, vocab) float32 logits (and, when differentiated, their
    gradient) at a time, whatever seq is; the gradients for ``hidden`` and ``head`` are formed in the
    forward pass (module docstring).
    """
    batch, seq, dim = np.shape(hidden)
    if np.shape(head)[1:] != (dim,) or np.ndim(head) != 2:
        raise ValueError(f"head must have shape (vocab, {dim}), got {np.shape(head)}")
    if np.shape(targets) != (batch, seq) or np.shape(weights) != (batch, seq):
        raise ValueError(f"targets and weights must have shape {(batch, seq)}, got {np.shape(targets)} and "
                         f"{np.shape(weights)}")
    check_integer("targets", targets)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    block = min(block_size, max(seq, 1))
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq

    def blocks(a):  # (batch, seq, ...) -> (n_blocks, batch, block, ...)
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(batch, n_blocks, block, *a.shape[2:]), 1, 0)

    safe_targets = jnp.clip(targets, 0, np.shape(head)[0] - 1)
    nll, correct = _blocked_sums(blocks(hidden), head, blocks(safe_targets), blocks(weights.astype(jnp.float32)))
    return CrossEntropySums(nll=nll, correct=lax.stop_gradient(correct), weight=jnp.sum(weights).astype(jnp.float32))


def _block_logits(h, head):
    """One block's float32 logits (batch, block, vocab), and h as multiplied (the product's dtype)."""
    mm_dtype = sequence_matmul_dtype(head.dtype)
    h = h.astype(head.dtype).astype(mm_dtype)
    return jnp.einsum("bsd,vd->bsv", h, head.astype(mm_dtype), preferred_element_type=jnp.float32), h


def _block_stats(z, t):
    """Per position: (logsumexp, max, exp(z - max), the target's logit) of float32 logits z."""
    top = jnp.max(z, axis=-1)
    e = jnp.exp(z - top[..., None])
    lse = top + jnp.log(jnp.sum(e, axis=-1))
    picked = jnp.take_along_axis(z, t[..., None], axis=-1)[..., 0]
    return lse, top, e, picked


def _scan_blocks(h_blocks, head, t_blocks, w_blocks, with_grads: bool):
    """Σ w·nll and Σ w·correct over the blocks; with ``with_grads`` also (∂/∂h blocks, ∂/∂head, nll)."""
    vocab, dim = head.shape
    mm_dtype = sequence_matmul_dtype(head.dtype)

    def body(carry, xs):
        h, t, w = xs
        z, h_mm = _block_logits(h, head)
        lse, top, e, picked = _block_stats(z, t)
        nll = lse - picked
        sums = (carry[0] + jnp.sum(w * nll), carry[1] + jnp.sum(w * (picked >= top)))
        if not with_grads:
            return sums, None
        # dz = w (softmax(z) - onehot(t)), formed in one fused elementwise pass over the block
        onehot = lax.broadcasted_iota(jnp.int32, z.shape, 2) == t[..., None]
        dz = w[..., None] * (e / jnp.sum(e, axis=-1, keepdims=True) - onehot)
        dz = dz.astype(mm_dtype)
        d_h = jnp.einsum("bsv,vd->bsd", dz, head.astype(mm_dtype), preferred_element_type=jnp.float32)
        d_head = carry[2] + jnp.einsum("bsv,bsd->vd", dz, h_mm, preferred_element_type=jnp.float32)
        return (*sums, d_head), (d_h, nll)

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero) + ((jnp.zeros((vocab, dim), jnp.float32),) if with_grads else ())
    return lax.scan(body, init, (h_blocks, t_blocks, w_blocks))


@jax.custom_vjp
def _blocked_sums(h_blocks, head, t_blocks, w_blocks):
    (nll, correct), _ = _scan_blocks(h_blocks, head, t_blocks, w_blocks, with_grads=False)
    return nll, correct


def _blocked_sums_fwd(h_blocks, head, t_blocks, w_blocks):
    (nll, correct, d_head), (d_h, nll_t) = _scan_blocks(h_blocks, head, t_blocks, w_blocks, with_grads=True)
    return (nll, correct), (d_h.astype(h_blocks.dtype), d_head.astype(head.dtype), nll_t, t_blocks)


def _blocked_sums_bwd(res, cotangents):
    d_h, d_head, nll_t, t_blocks = res
    g = cotangents[0]  # the correct-count is piecewise constant: its cotangent contributes nothing
    float0 = np.zeros(np.shape(t_blocks), jax.dtypes.float0)
    return ((g * d_h).astype(d_h.dtype), (g * d_head).astype(d_head.dtype), float0, g * nll_t)


_blocked_sums.defvjp(_blocked_sums_fwd, _blocked_sums_bwd)

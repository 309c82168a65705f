"""One round of speculative decoding: propose k drafts, verify them in one target pass, accept each row's
longest good prefix (exactly: greedy or by min(1, p/q) with residual resampling), commit, roll the draft
source back. The loop around it is ``ssdkit.inference.speculative``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ssdkit._typing import Lengths
from ssdkit.inference.drafts import Evidence
from ssdkit.inference.sampling import Greedy, sample_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Round:
    """What a round gives back (every branch of the round's ``lax.switch`` the same shapes)."""

    emitted: Int[Array, "batch width"]  # the n accepted drafts, then the target's own token; later: filler
    produced: Lengths  # n + 1
    cache: Any
    source: Any  # the draft source's state
    drafted: Lengths  # drafts verified this round (0 in a plain round)
    accepted: Lengths  # n
    evidence: Evidence  # how often a first draft held (or would have): the adaptive rule's input


def _leading_true(mask) -> Int[Array, " batch"]:
    """How many leading entries of each row of a (batch, k) bool array are True."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def accept(sampler, logits, drafts, count, log_q, key):
    """Row-wise acceptance of ``drafts`` (batch, k) against the target's ``logits`` (batch, k + 1, vocab).

    Returns (n accepted (batch,), the token appended after them (batch,)). ``count[b]`` drafts of row b
    are real; ``log_q`` (batch, k, vocab) is the draft distribution (None: one-hot, e.g. a lookup's drafts).
    """
    batch, k = drafts.shape
    valid = jnp.arange(k)[None, :] < count[:, None]
    if isinstance(sampler, Greedy):
        target = sampler(logits)  # (batch, k + 1)
        n = _leading_true((drafts == target[:, :k]) & valid)
        return n, jnp.take_along_axis(target, n[:, None], axis=1)[:, 0]
    key_accept, key_fix = jax.random.split(key)
    log_p = jax.nn.log_softmax(sampler.filtered_logits(logits), axis=-1)  # (batch, k + 1, vocab)
    p_d = jnp.exp(jnp.take_along_axis(log_p[:, :k], drafts[..., None], axis=-1)[..., 0])
    q_d = 1.0 if log_q is None else jnp.exp(jnp.take_along_axis(log_q, drafts[..., None], axis=-1)[..., 0])
    u = jax.random.uniform(key_accept, (batch, k), jnp.float32)
    n = _leading_true((u * q_d < p_d) & valid)  # accept with probability min(1, p / q)
    p_n = jnp.exp(jnp.take_along_axis(log_p, n[:, None, None], axis=1)[:, 0])  # (batch, vocab)
    at = jnp.minimum(n, k - 1)[:, None, None]
    if log_q is None:
        q_n = jax.nn.one_hot(jnp.take_along_axis(drafts, at[..., 0], axis=1)[:, 0], p_n.shape[-1], dtype=p_n.dtype)
    else:
        q_n = jnp.exp(jnp.take_along_axis(log_q, at, axis=1)[:, 0])
    residual = jnp.maximum(p_n - q_n, 0.0)
    rejected = (n < count) & (jnp.sum(residual, axis=-1) > 0)  # else: all accepted, the bonus token from p
    weights = jnp.where(rejected[:, None], residual, p_n)
    fix = jax.random.categorical(key_fix, jnp.log(weights), axis=-1).astype(jnp.int32)
    return n, fix


def run_round(k: int, model, source, params, draft_params, sampler, last, cache, state, candidates, count, keys,
              at, width: int) -> Round:
    """One round with k drafts (k = 0: a plain decode step) fed ``last`` first, its tokens written at ``at``
    in the source's text; ``emitted`` padded to ``width`` columns. ``keys``: (drafting, target) keys."""
    batch = last.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    if k == 0:
        logits, cache = model.decode(params, last, cache)
        token = sample_tokens(sampler, logits, keys[1], 0, batch)
        state, evidence = source.follow(state, draft_params, sampler, last, token, logits, candidates, count, at)
        return Round(emitted=jnp.pad(token[:, None], ((0, 0), (0, width - 1))), produced=jnp.ones((batch,), jnp.int32),
                     cache=cache, source=state, drafted=zeros, accepted=zeros, evidence=evidence)
    state, drafts, evidence = source.propose(state, draft_params, sampler, last, k, keys[0], candidates, count)
    fed = jnp.concatenate([last[:, None], drafts.tokens], axis=1)  # (batch, k + 1)
    logits, record = model.verify(params, fed, cache)
    n, fix = accept(sampler, logits, drafts.tokens, drafts.count, drafts.log_q, keys[1])
    cache = model.commit(record, n + 1)
    columns = jnp.arange(k + 1)[None, :]  # the n accepted drafts, then the target's own token
    emitted = jnp.where(columns < n[:, None], jnp.pad(drafts.tokens, ((0, 0), (0, 1))), 0)
    emitted = jnp.where(columns == n[:, None], fix[:, None], emitted)
    state = source.roll_back(state, draft_params, fed, n + 1, emitted, at)
    rejected = (n < drafts.count).astype(jnp.float32)
    held = n.astype(jnp.float32)
    return Round(emitted=jnp.pad(emitted, ((0, 0), (0, width - k - 1))), produced=n + 1, cache=cache, source=state,
                 drafted=drafts.count, accepted=n, evidence=evidence.plus(Evidence(held, held + rejected)))



"""Speculative generation: the compiled loop behind ``ssdkit.generate(..., speculative=Speculative(...))``.

One ``lax.while_loop`` (no host round trip; the traced program does not grow with ``max_new_tokens``).
Its carry holds each row's last emitted token (not yet fed to the model), the cache after every earlier
token, the output buffer, for prompt lookup the row's text, and the plan for the next round (its k and
proposals). Plain rounds (k = 0) run in an inner ``while_loop`` of their own, as plain decoding does:
behind a conditional, XLA copies every layer's state each iteration (it cannot update a conditional's
operand in place), which on 130M cost 10-20% of a plain step. Only the other rounds (and feeding a draft
model's queue) sit behind the ``lax.switch``. A round:

1. proposes up to k tokens per row (:class:`~ssdkit.PromptLookup` or a :class:`~ssdkit.DraftModel`),
   with k chosen per round from the compiled lengths (``Speculative.draft_lengths``; k = 0 is a plain
   decode step);
2. verifies ``[last, d_1 .. d_k]`` in one pass of the target model: logits at k + 1 positions;
3. accepts each row's longest good prefix of drafts (``n`` of them) and appends one token of the target's
   own: the correction at the first rejected position, or a bonus token after k accepted drafts;
4. commits ``last, d_1 .. d_n`` to the cache (``model.commit``: no second weight pass, no snapshots).

Rows accept independently. Acceptance is exact:

* greedy: a draft is accepted iff it is the target's argmax there, and the correction is the argmax, so
  the tokens are those of plain greedy decoding (up to near ties between the two programs' rounding);
* sampling: draft token d drawn from q is accepted with probability min(1, p(d) / q(d)), and after a
  rejection the token is drawn from the residual max(p - q, 0) normalised (Leviathan et al. 2023, Chen
  et al. 2023), so every token has exactly the target's distribution p (the sampler's temperature /
  top-k / top-p applied to both p and q). Prompt lookup's drafts are deterministic: q is one-hot.

The random stream differs from plain sampling's (same distribution, different draws).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float, Int

from ssdkit._typing import Lengths
from ssdkit.drafts import DraftModel, PromptLookup, Speculative, draft_with_model
from ssdkit.generate import GenerationResult, Greedy, SpeculationStats, _prefill_and_sample, _sample
from ssdkit.xla_options import inference_jit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SpecState:
    round: Int[Array, ""]
    last: Int[Array, " batch"]  # emitted, not yet fed to the target
    out: Int[Array, "batch room"]  # the output buffer, k + 1 spare columns
    lengths: Lengths  # tokens emitted per row (EOS included)
    done: Any  # (batch,) bool: EOS emitted or the buffer full
    cache: Any  # target cache after every emitted token but `last`
    draft: Any  # _DraftState (None for prompt lookup)
    history: Any  # (batch, prompt + room) prompt then emitted tokens (prompt lookup; else None)
    accepted_ema: Float[Array, ""]  # decayed counts of accepted and rejected drafts (the adaptive rule)
    rejected_ema: Float[Array, ""]
    stats: SpeculationStats
    # the next round's plan: index into Speculative.draft_lengths, and prompt lookup's proposals
    choice: Int[Array, ""]
    proposals: Any  # (batch, K) (prompt lookup; else None)
    count: Lengths  # real proposals per row (K for a draft model)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _DraftState:
    """A draft model's cache and the tokens it has not been fed yet.

    Plain rounds do not run the draft: they queue the token (``pending``, with the target's probability
    of the token that followed it, ``pending_p``), and the queue is fed in one ``verify`` + ``commit``
    when full or before the next drafting round. That costs about one draft decode step per queue
    instead of one per token, and the verify's logits say, for free, how often the draft would have
    guessed right (the adaptive rule's evidence).
    """

    cache: Any  # after every emitted token but `last` and the pending ones
    pending: Int[Array, "batch width"]
    pending_n: Lengths
    pending_p: Float[Array, "batch width"]  # target probability of the token after each pending one


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RoundOut:
    """What a round gives back (every branch of the round's ``lax.switch`` the same shapes)."""

    emitted: Int[Array, "batch width"]  # the n accepted drafts, then the target's own token; later: filler
    produced: Lengths  # n + 1
    cache: Any
    draft: Any  # _DraftState or None
    drafted: Lengths  # drafts verified this round (0 in a plain round)
    accepted: Lengths  # n
    # Evidence on how often a first draft would hold (the adaptive rule): verified drafts' outcomes, or in a
    # plain round the chance the draft source's next-token guess would have been accepted (free to compute).
    evidence: Float[Array, " batch"]  # accepted drafts (or that chance)
    trials: Float[Array, " batch"]  # rejections plus accepted drafts: the counts of a geometric law


def _queue_width(big_k: int) -> int:
    """Tokens a draft model's queue holds: fed in one verify when full, so the draft follows plain rounds
    at the cost of one weight pass per this many tokens (4 × (K + 1): with 9, a 20-layer 130M draft that
    never held cost 15% of a plain step per token)."""
    return 4 * (big_k + 1)


_DECAY = 0.9  # per round: the weight of the past in the acceptance counts
_MARGIN = 1.1  # a round of drafts must promise this many times plain decoding's tokens per cost


def _leading_true(mask) -> Int[Array, " batch"]:
    """How many leading entries of each row of a (batch, k) bool array are True."""
    return jnp.sum(jnp.cumprod(mask.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def _accept(sampler, logits, drafts, count, log_q, key):
    """Row-wise acceptance of ``drafts`` (batch, k) against the target's ``logits`` (batch, k + 1, vocab).

    Returns (n accepted (batch,), the token appended after them (batch,)). ``count[b]`` drafts of row b
    are real; ``log_q`` (batch, k, vocab) is the draft distribution (None: one-hot, a lookup's drafts).
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


def _choose(spec: Speculative, s: _SpecState, count) -> Int[Array, ""]:
    """Index into ``spec.draft_lengths`` of this round's draft length (module docstring of drafts)."""
    lengths = spec.draft_lengths
    active = ~s.done
    can = jnp.any(active & (count > 0))
    if not spec.adaptive:
        return jnp.where(can, len(lengths) - 1, 0).astype(jnp.int32)
    alpha = (s.accepted_ema + 1.0) / (s.accepted_ema + s.rejected_ema + 2.0)  # prior 1/2, worth 2 drafts
    rows = jnp.maximum(jnp.sum(active), 1)
    gains = []
    for k, cost in zip(lengths, spec.round_costs, strict=True):
        drafts = jnp.minimum(count, k)  # (batch,)
        expected = jnp.sum(jnp.where(active, (1 - alpha ** (drafts + 1)) / (1 - alpha), 0.0)) / rows
        gains.append(expected / cost)
    gains = jnp.stack(gains)
    choice = jnp.argmax(gains).astype(jnp.int32)
    # Speculate only for a clear gain: measured round costs vary by some 10-30% from run to run.
    choice = jnp.where(gains[choice] > _MARGIN * gains[0], choice, 0)
    return jnp.where(can, choice, 0).astype(jnp.int32)


def _round(k, model, params, draft, draft_params, sampler, last, cache, draft_state, proposals, count, keys,
           width) -> _RoundOut:
    """One round with k drafts (k = 0: a plain decode step); ``emitted`` padded to ``width`` columns.
    ``proposals`` / ``count``: prompt lookup's (None for a draft model)."""
    batch = last.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    if k == 0:
        logits, cache = model.decode(params, last, cache)
        token = _sample(sampler, logits, keys[1], 0, batch)
        if draft is not None:  # queue `last` for the draft (the loop feeds the queue when it is full)
            p_token = _probability(sampler, logits, token)
            d = draft_state
            draft_state = dataclasses.replace(d, pending=_write(d.pending, last[:, None], d.pending_n),
                                              pending_p=_write(d.pending_p, p_token[:, None], d.pending_n),
                                              pending_n=d.pending_n + 1)
            evidence = trials = jnp.zeros((batch,), jnp.float32)  # counted when the queue is fed
        else:  # lookup: would its first proposal have held?
            chance = _first_draft_chance(sampler, logits, token, proposals[:, 0])
            trials = (count > 0).astype(jnp.float32)
            evidence = jnp.where(count > 0, chance, 0.0)
        return _RoundOut(
            emitted=jnp.pad(token[:, None], ((0, 0), (0, width - 1))), produced=jnp.ones((batch,), jnp.int32),
            cache=cache, draft=draft_state, drafted=zeros, accepted=zeros, evidence=evidence, trials=trials,
        )
    log_q = None
    evidence = trials = jnp.zeros((batch,), jnp.float32)
    if draft is None:
        drafts, drafted = proposals[:, :k], jnp.minimum(count, k)
    else:
        draft_state, evidence, trials = lax.cond(
            jnp.any(draft_state.pending_n > 0), functools.partial(_feed_draft, draft, draft_params, sampler, last),
            _nothing_fed, draft_state)
        drafts, log_q = draft_with_model(draft, draft_params, draft_state.cache, last, k, sampler, keys[0])
        drafted = jnp.full((batch,), k, jnp.int32)
    fed = jnp.concatenate([last[:, None], drafts], axis=1)  # (batch, k + 1)
    logits, record = model.verify(params, fed, cache)
    n, fix = _accept(sampler, logits, drafts, drafted, log_q, keys[1])
    cache = model.commit(record, n + 1)
    if draft is not None:
        _, draft_record = draft.verify(draft_params, fed, draft_state.cache)
        draft_state = dataclasses.replace(draft_state, cache=draft.commit(draft_record, n + 1))
    columns = jnp.arange(width)[None, :]  # the n accepted drafts, then the target's own token
    emitted = jnp.where(columns < n[:, None], jnp.pad(drafts, ((0, 0), (0, width - k))), 0)
    emitted = jnp.where(columns == n[:, None], fix[:, None], emitted)
    rejected = (n < drafted).astype(jnp.float32)
    return _RoundOut(
        emitted=emitted, produced=n + 1, cache=cache, draft=draft_state, drafted=drafted, accepted=n,
        evidence=evidence + n.astype(jnp.float32), trials=trials + n.astype(jnp.float32) + rejected,
    )


def _feed_draft(draft, draft_params, sampler, following, d: _DraftState):
    """Feed the draft its pending tokens (``following``: the token after the last of them); returns the
    emptied state and, per row, evidence / trials: how many of the tokens it would have guessed."""
    logits, record = draft.verify(draft_params, d.pending, d.cache)
    cache = draft.commit(record, d.pending_n)
    width = d.pending.shape[1]
    columns = jnp.arange(width)[None, :]
    last_pending = columns == (d.pending_n - 1)[:, None]
    actual = jnp.where(last_pending, following[:, None], jnp.roll(d.pending, -1, axis=1))  # what followed
    if isinstance(sampler, Greedy):
        chance = (sampler(logits) == actual).astype(jnp.float32)
    else:  # E over the target's draws t of min(1, q(t) / p(t)) is Σ_v min(p_v, q_v), the acceptance chance
        log_q = jax.nn.log_softmax(sampler.filtered_logits(logits), axis=-1)
        q = jnp.exp(jnp.take_along_axis(log_q, actual[..., None], axis=-1)[..., 0])
        chance = jnp.minimum(1.0, q / jnp.maximum(d.pending_p, 1e-30))
    valid = columns < d.pending_n[:, None]
    emptied = _DraftState(cache=cache, pending=d.pending, pending_n=jnp.zeros_like(d.pending_n),
                          pending_p=d.pending_p)
    return emptied, jnp.sum(jnp.where(valid, chance, 0.0), axis=1), d.pending_n.astype(jnp.float32)


def _nothing_fed(d: _DraftState):
    none = jnp.zeros(d.pending_n.shape, jnp.float32)
    return d, none, none


def _probability(sampler, logits, token):
    """The target's probability of ``token`` under the sampler (1 for greedy: not needed there)."""
    if isinstance(sampler, Greedy):
        return jnp.ones(token.shape, jnp.float32)
    log_p = jax.nn.log_softmax(sampler.filtered_logits(logits), axis=-1)
    return jnp.exp(jnp.take_along_axis(log_p, token[:, None], axis=1)[:, 0])


def _first_draft_chance(sampler, logits, token, guess):
    """The chance that ``guess`` (batch,), drafted for the token the target just produced, would have been
    accepted: for greedy whether it equals the token, for sampling p(guess)."""
    if isinstance(sampler, Greedy):
        return (guess == token).astype(jnp.float32)
    return _probability(sampler, logits, guess.astype(jnp.int32))


def speculative_loop(
    model, params, draft_params, prompt, lengths, key, *, max_new_tokens: int, sampler, eos_token_id, pad_token_id,
    speculative: Speculative,
):
    """The traced body of speculative :func:`ssdkit.generate`: returns (tokens, lengths, stats)."""
    batch, prompt_len = prompt.shape
    spec = speculative
    big_k = spec.draft_tokens
    room = max_new_tokens + big_k + 1  # a round writes k + 1 columns from each row's length
    lookup = isinstance(spec.draft, PromptLookup)
    draft = spec.draft.model if isinstance(spec.draft, DraftModel) else None
    prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32) if lengths is None else lengths

    token, logits, cache = _prefill_and_sample(model, params, prompt, lengths, key, sampler)
    draft_state = None
    if draft is not None:
        draft_logits, draft_cache = (draft.prefill(draft_params, prompt) if lengths is None
                                     else draft.prefill(draft_params, prompt, lengths=lengths))
        if draft_logits.shape != logits.shape:
            raise ValueError(
                f"the draft model's logits have shape {draft_logits.shape}, the target's {logits.shape}: a draft "
                f"model needs the target's vocabulary (the same logits width)"
            )
        draft_state = _empty_draft_state(draft_cache, batch, _queue_width(big_k))
    history = None
    if lookup:
        history = jnp.concatenate([prompt, jnp.zeros((batch, room), jnp.int32)], axis=1)
        history = _write(history, token[:, None], prompt_lengths)
    out = jnp.full((batch, room), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = jnp.zeros((batch,), bool) if eos_token_id is None else token == eos_token_id
    done |= max_new_tokens <= 1

    def plan(s: _SpecState) -> _SpecState:
        """Decide the next round: prompt lookup's proposals and the draft length (``_choose``)."""
        if lookup:
            proposals, count = spec.draft.propose(s.history, prompt_lengths + s.lengths, big_k)
        else:
            proposals, count = None, jnp.full((batch,), big_k, jnp.int32)
        return dataclasses.replace(s, choice=_choose(spec, s, count), proposals=proposals, count=count)

    zeros = jnp.zeros((batch,), jnp.int32)
    init = plan(_SpecState(
        round=jnp.int32(0), last=token, out=out, lengths=jnp.ones((batch,), jnp.int32), done=done, cache=cache,
        draft=draft_state, history=history, accepted_ema=jnp.float32(0), rejected_ema=jnp.float32(0),
        stats=SpeculationStats(jnp.int32(0), jnp.int32(0), zeros, zeros), choice=jnp.int32(0), proposals=None,
        count=zeros,
    ))
    loop_key = None if key is None else jax.random.fold_in(key, 1)

    def run_round(k: int, s: _SpecState) -> _SpecState:
        """Round ``k`` (a plain step for 0), its tokens written, its evidence counted, the next one planned."""
        round_key = None if loop_key is None else jax.random.fold_in(loop_key, s.round)
        keys = (None, None) if round_key is None else tuple(jax.random.split(round_key))
        r = _round(k, model, params, draft, draft_params, sampler, s.last, s.cache, s.draft, s.proposals, s.count,
                   keys, big_k + 1)
        emitted, produced = r.emitted, r.produced

        # Keep each row's tokens up to its EOS and the buffer's end; finished rows keep nothing.
        columns = jnp.arange(big_k + 1)[None, :]
        kept = produced
        if eos_token_id is not None:
            is_eos = (emitted == eos_token_id) & (columns < produced[:, None])
            kept = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, produced)
        kept = jnp.where(s.done, 0, jnp.minimum(kept, max_new_tokens - s.lengths)).astype(jnp.int32)
        new_lengths = s.lengths + kept
        finished = new_lengths >= max_new_tokens
        if eos_token_id is not None:
            finished |= jnp.any((emitted == eos_token_id) & (columns < kept[:, None]), axis=1)
        live = ~s.done
        stats = s.stats
        return plan(dataclasses.replace(
            s,
            round=s.round + 1,
            last=jnp.take_along_axis(emitted, (produced - 1)[:, None], axis=1)[:, 0],
            out=_write(s.out, emitted, s.lengths),
            lengths=new_lengths,
            done=s.done | finished,
            cache=r.cache,
            draft=r.draft,
            history=None if s.history is None else _write(s.history, emitted, prompt_lengths + s.lengths),
            accepted_ema=_DECAY * s.accepted_ema + jnp.sum(jnp.where(live, r.evidence, 0.0)),
            rejected_ema=_DECAY * s.rejected_ema + jnp.sum(jnp.where(live, r.trials - r.evidence, 0.0)),
            stats=SpeculationStats(
                passes=stats.passes + 1,
                verifies=stats.verifies + int(k > 0),
                drafted=stats.drafted + jnp.where(live, r.drafted, 0),
                accepted=stats.accepted + jnp.where(live, r.accepted, 0),
            ),
        ))

    def feed(s: _SpecState) -> _SpecState:
        """Feed the draft model its full queue (one verify + commit); what it would have guessed is evidence."""
        d, evidence, trials = _feed_draft(draft, draft_params, sampler, s.last, s.draft)
        live = ~s.done
        return plan(dataclasses.replace(
            s, draft=d, accepted_ema=s.accepted_ema + jnp.sum(jnp.where(live, evidence, 0.0)),
            rejected_ema=s.rejected_ema + jnp.sum(jnp.where(live, trials - evidence, 0.0))))

    def plain_runs(s: _SpecState) -> Any:
        go = ~jnp.all(s.done) & (s.choice == 0)
        if draft is not None:
            go &= ~jnp.any(s.draft.pending_n >= s.draft.pending.shape[1])
        return go

    def cond(s: _SpecState):
        return ~jnp.all(s.done)

    def body(s: _SpecState) -> _SpecState:
        s = lax.while_loop(plain_runs, functools.partial(run_round, 0), s)
        # Out of the plain run: all rows done, a full draft queue, or a round of drafts planned.
        branches = [lambda s: s, feed if draft is not None else (lambda s: s)]
        branches += [functools.partial(run_round, k) for k in spec.draft_lengths[1:]]
        index = jnp.where(jnp.all(s.done), 0, jnp.where(s.choice == 0, 1, s.choice + 1))
        return lax.switch(index, branches, s)

    final = lax.while_loop(cond, body, init)
    columns = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(columns < final.lengths[:, None], final.out[:, :max_new_tokens], pad_token_id)
    return tokens, final.lengths, final.stats


_ROUND_COSTS: dict[Any, tuple[float, ...]] = {}
_GREEDY = Greedy()


def measure_round_costs(
    model, params, prompt, speculative: Speculative, *, sampler=_GREEDY, draft_params=None, rounds: int = 32,
    repeats: int = 7,
) -> tuple[float, ...]:
    """Time a round of each of ``speculative.draft_lengths`` drafts on this machine, in plain decode steps.

    The code the loop runs, from the cache after ``prompt`` (batch as given): plain rounds in a while loop
    of their own (a draft model's queue fed when full), and one program for the rounds with drafts (draft
    + verify + accept + commit) behind the loop's ``lax.switch``, the kind chosen at run time. Each repeat
    times every kind in turn (``rounds`` rounds); a kind's cost is the median over repeats of its time per
    round divided by the plain round's of the same repeat, rounded to 2 digits. Kept per model, sampler,
    draft, batch and parameter shapes for the process, so :func:`ssdkit.generate` measures once.
    """
    import time

    draft = speculative.draft.model if isinstance(speculative.draft, DraftModel) else None
    shapes = jax.tree_util.tree_map(lambda a: (jnp.shape(a), jnp.result_type(a)), (params, draft_params))
    key_ = (model, type(sampler), draft, speculative.draft_lengths, jnp.shape(prompt)[0], jax.default_backend(),
            jax.tree_util.tree_structure(shapes), tuple(jax.tree_util.tree_leaves(shapes)))
    hit = _ROUND_COSTS.get(key_)
    if hit is not None:
        return hit
    prompt = jnp.asarray(prompt, jnp.int32)
    batch = prompt.shape[0]
    _, cache = jax.jit(model.prefill)(params, prompt)
    draft_cache = None if draft is None else jax.jit(draft.prefill)(draft_params, prompt)[1]
    big_k = speculative.draft_tokens
    proposals = jnp.broadcast_to(prompt[:, -1:], (batch, big_k))  # any tokens: the cost does not depend on them
    count = jnp.full((batch,), big_k, jnp.int32)
    keys = (None, None) if isinstance(sampler, Greedy) else tuple(jax.random.split(jax.random.key(0)))

    queue = _queue_width(big_k)
    plain_rounds = max(rounds // queue, 1) * queue  # whole queues: a draft model's is fed after each
    round_args = (None if draft is not None else proposals, count, keys, big_k + 1)  # after the cache, draft state

    @inference_jit  # compiled as the loop is: the costs are of the programs it runs
    def plain(params, draft_params, cache, draft_cache):
        """``plain_rounds`` plain rounds as the loop runs them: in a while loop of their own, a draft model's
        queue fed (outside the loop's switch) whenever it is full."""
        def one(carry):
            last, cache, draft_state = carry
            r = _round(0, model, params, draft, draft_params, sampler, last, cache, draft_state, *round_args)
            return r.emitted[:, 0], r.cache, r.draft

        def group(_, carry):  # `queue` rounds fill the queue; then it is fed
            carry = lax.fori_loop(0, queue, lambda _, c: one(c), carry)
            if draft is None:
                return carry
            last, cache, draft_state = carry
            return last, cache, _feed_draft(draft, draft_params, sampler, last, draft_state)[0]

        draft_state = None if draft is None else _empty_draft_state(draft_cache, batch, queue)
        return lax.fori_loop(0, plain_rounds // queue, group, (prompt[:, -1], cache, draft_state))

    @inference_jit
    def drafting(choice, params, draft_params, cache, draft_cache):
        """``rounds`` rounds of the chosen k > 0, behind a ``lax.switch`` as in the loop (one compilation)."""
        def one(_, carry):
            last, cache, draft_state = carry
            r = lax.switch(choice - 1, [functools.partial(_round, k, model, params, draft, draft_params, sampler, last,
                                                          cache, draft_state, *round_args)
                                        for k in speculative.draft_lengths[1:]])
            return r.emitted[:, 0], r.cache, r.draft

        draft_state = None if draft is None else _empty_draft_state(draft_cache, batch, queue)
        return lax.fori_loop(0, rounds, one, (prompt[:, -1], cache, draft_state))

    def timed(choice):
        start = time.perf_counter()
        if choice == 0:
            jax.block_until_ready(plain(params, draft_params, cache, draft_cache))
            return (time.perf_counter() - start) / plain_rounds
        jax.block_until_ready(drafting(jnp.int32(choice), params, draft_params, cache, draft_cache))
        return (time.perf_counter() - start) / rounds

    kinds = range(len(speculative.draft_lengths))
    for choice in kinds:  # compile, warm up
        timed(choice)
    ratios = []  # each kind against the plain round timed next to it: drift hits both alike
    for _ in range(repeats):
        seconds = [timed(choice) for choice in kinds]
        ratios.append([t / seconds[0] for t in seconds])
    costs = tuple(max(round(float(np.median([r[i] for r in ratios])), 2), 0.01) for i in kinds)
    _ROUND_COSTS[key_] = costs
    return costs


def check_speculative(model, sampler, speculative, draft_params) -> None:
    """Raise a plain-words error unless the request can decode speculatively."""
    if not isinstance(speculative, Speculative):
        raise TypeError(f"speculative must be ssdkit.Speculative(...), got {speculative!r}")
    for name, obj in (("model", model),) + ((("draft model", speculative.draft.model),)
                                            if isinstance(speculative.draft, DraftModel) else ()):
        missing = [m for m in ("prefill", "decode", "verify", "commit") if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(
                f"speculative decoding needs a {name} with verify(params, tokens, cache) and commit(record, "
                f"accepted) besides prefill / decode; {type(obj).__name__} lacks {', '.join(missing)}"
            )
    if not isinstance(sampler, Greedy) and not callable(getattr(sampler, "filtered_logits", None)):
        raise TypeError(
            f"speculative sampling needs the sampler's distribution: use Greedy() or Sample(...) (a sampler with "
            f"filtered_logits), got {sampler!r}"
        )
    if isinstance(speculative.draft, DraftModel):
        try:
            hash(speculative.draft.model)
        except TypeError:
            raise TypeError("DraftModel.model must be hashable (a frozen dataclass): it is a static jit argument") \
                from None
        if draft_params is None:
            raise ValueError("a DraftModel needs its parameters: pass draft_params=")
    elif draft_params is not None:
        raise ValueError("draft_params is only for Speculative(draft=DraftModel(...)); prompt lookup has no model")


def _empty_draft_state(cache, batch: int, width: int) -> _DraftState:
    return _DraftState(cache=cache, pending=jnp.zeros((batch, width), jnp.int32),
                       pending_n=jnp.zeros((batch,), jnp.int32), pending_p=jnp.ones((batch, width), jnp.float32))


def _write(buffer, values, at):
    """``buffer[b, at[b] : at[b] + w] = values[b]`` for every row (w = values' width; within the buffer)."""
    return jax.vmap(lambda row, v, i: lax.dynamic_update_slice(row, v, (i,)))(buffer, values, at)


@functools.partial(
    inference_jit,
    static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id", "speculative"),
)
def generate_speculative(
    model, params, draft_params, prompt, lengths, key, *, max_new_tokens, sampler, eos_token_id, pad_token_id,
    speculative,
) -> GenerationResult:
    """:func:`speculative_loop` compiled into one program (called by :func:`ssdkit.generate`)."""
    tokens, lengths, stats = speculative_loop(
        model, params, draft_params, prompt, lengths, key, max_new_tokens=max_new_tokens, sampler=sampler,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, speculative=speculative,
    )
    return GenerationResult(tokens=tokens, lengths=lengths, speculation=stats)

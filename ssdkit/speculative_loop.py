"""Speculative generation: the compiled loop behind ``ssdkit.generate(..., speculative=Speculative(...))``.

One ``lax.while_loop`` (no host round trip; the traced program does not grow with ``max_new_tokens``).
Its carry holds each row's last emitted token (not yet fed to the model), the cache after every earlier
token, the output buffer and, for prompt lookup, the row's text. A round:

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
from jax import lax
from jaxtyping import Array, Float, Int

from ssdkit._typing import Lengths
from ssdkit.drafts import DraftModel, PromptLookup, Speculative, draft_with_model
from ssdkit.generate import GenerationResult, Greedy, SpeculationStats, _prefill_and_sample, _sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SpecState:
    round: Int[Array, ""]
    last: Int[Array, " batch"]  # emitted, not yet fed to the target
    out: Int[Array, "batch room"]  # the output buffer, k + 1 spare columns
    lengths: Lengths  # tokens emitted per row (EOS included)
    done: Any  # (batch,) bool: EOS emitted or the buffer full
    cache: Any  # target cache after every emitted token but `last`
    draft_cache: Any  # the draft model's, likewise (None for prompt lookup)
    history: Any  # (batch, prompt + room) prompt then emitted tokens (prompt lookup; else None)
    accepted_ema: Float[Array, ""]  # decayed counts of accepted and rejected drafts (the adaptive rule)
    rejected_ema: Float[Array, ""]
    stats: SpeculationStats


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _RoundOut:
    """What a round gives back (every branch of the round's ``lax.switch`` the same shapes)."""

    emitted: Int[Array, "batch width"]  # the n accepted drafts, then the target's own token; later: filler
    produced: Lengths  # n + 1
    cache: Any
    draft_cache: Any
    drafted: Lengths  # drafts verified this round (0 in a plain round)
    accepted: Lengths  # n
    # Evidence on how often a first draft would hold (the adaptive rule): verified drafts' outcomes, or in a
    # plain round the chance the draft source's next-token guess would have been accepted (free to compute).
    evidence: Float[Array, " batch"]  # accepted drafts (or that chance)
    trials: Float[Array, " batch"]  # rejections plus accepted drafts: the counts of a geometric law


_DECAY = 0.9  # per round: the weight of the past in the acceptance counts


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
        target = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)  # (batch, k + 1)
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
    choice = jnp.argmax(jnp.stack(gains)).astype(jnp.int32)
    return jnp.where(can, choice, 0).astype(jnp.int32)


def _round(k, model, params, draft, draft_params, sampler, last, cache, draft_cache, proposals, count, keys,
           width) -> _RoundOut:
    """One round with k drafts (k = 0: a plain decode step); ``emitted`` padded to ``width`` columns.
    ``proposals`` / ``count``: prompt lookup's (None for a draft model)."""
    batch = last.shape[0]
    if k == 0:
        logits, cache = model.decode(params, last, cache)
        token = _sample(sampler, logits, keys[1], 0, batch)
        if draft is not None:  # the draft follows the text; its guess at this token is the evidence
            guess_logits, draft_cache = draft.decode(draft_params, last, draft_cache)
            chance, valid = _first_draft_chance(sampler, logits, token, guess_logits=guess_logits)
        else:
            chance, valid = _first_draft_chance(sampler, logits, token, guess=proposals[:, 0])
            valid &= count > 0
        zeros = jnp.zeros((batch,), jnp.int32)
        return _RoundOut(
            emitted=jnp.pad(token[:, None], ((0, 0), (0, width - 1))), produced=jnp.ones((batch,), jnp.int32),
            cache=cache, draft_cache=draft_cache, drafted=zeros, accepted=zeros,
            evidence=jnp.where(valid, chance, 0.0), trials=valid.astype(jnp.float32),
        )
    log_q = None
    if draft is None:
        drafts, drafted = proposals[:, :k], jnp.minimum(count, k)
    else:
        drafts, log_q = draft_with_model(draft, draft_params, draft_cache, last, k, sampler, keys[0])
        drafted = jnp.full((batch,), k, jnp.int32)
    fed = jnp.concatenate([last[:, None], drafts], axis=1)  # (batch, k + 1)
    logits, record = model.verify(params, fed, cache)
    n, fix = _accept(sampler, logits, drafts, drafted, log_q, keys[1])
    cache = model.commit(record, n + 1)
    if draft is not None:
        _, draft_record = draft.verify(draft_params, fed, draft_cache)
        draft_cache = draft.commit(draft_record, n + 1)
    columns = jnp.arange(width)[None, :]  # the n accepted drafts, then the target's own token
    emitted = jnp.where(columns < n[:, None], jnp.pad(drafts, ((0, 0), (0, width - k))), 0)
    emitted = jnp.where(columns == n[:, None], fix[:, None], emitted)
    rejected = (n < drafted).astype(jnp.float32)
    return _RoundOut(
        emitted=emitted, produced=n + 1, cache=cache, draft_cache=draft_cache, drafted=drafted, accepted=n,
        evidence=n.astype(jnp.float32), trials=n.astype(jnp.float32) + rejected,
    )


def _first_draft_chance(sampler, logits, token, *, guess=None, guess_logits=None):
    """The chance that a draft of the token the target just produced would have been accepted, per row:
    for greedy whether the guess equals it; for sampling the acceptance probability of a drawn draft,
    p(guess) for a fixed guess, Σ_v min(p_v, q_v) for a draft distribution q. Returns (chance, valid)."""
    batch = token.shape[0]
    valid = jnp.ones((batch,), bool)
    if isinstance(sampler, Greedy):
        if guess is None:
            guess = jnp.argmax(guess_logits.astype(jnp.float32), axis=-1)
        return (guess == token).astype(jnp.float32), valid
    p = jax.nn.softmax(sampler.filtered_logits(logits), axis=-1)
    if guess is not None:
        return jnp.take_along_axis(p, guess[:, None].astype(jnp.int32), axis=1)[:, 0], valid
    q = jax.nn.softmax(sampler.filtered_logits(guess_logits), axis=-1)
    return jnp.sum(jnp.minimum(p, q), axis=-1), valid


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
    draft_cache = None
    if draft is not None:
        draft_logits, draft_cache = (draft.prefill(draft_params, prompt) if lengths is None
                                     else draft.prefill(draft_params, prompt, lengths=lengths))
        if draft_logits.shape != logits.shape:
            raise ValueError(
                f"the draft model's logits have shape {draft_logits.shape}, the target's {logits.shape}: a draft "
                f"model needs the target's vocabulary (the same logits width)"
            )
    history = None
    if lookup:
        history = jnp.concatenate([prompt, jnp.zeros((batch, room), jnp.int32)], axis=1)
        history = _write(history, token[:, None], prompt_lengths)
    out = jnp.full((batch, room), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = jnp.zeros((batch,), bool) if eos_token_id is None else token == eos_token_id
    done |= max_new_tokens <= 1
    zeros = jnp.zeros((batch,), jnp.int32)
    init = _SpecState(
        round=jnp.int32(0), last=token, out=out, lengths=jnp.ones((batch,), jnp.int32), done=done, cache=cache,
        draft_cache=draft_cache, history=history, accepted_ema=jnp.float32(0), rejected_ema=jnp.float32(0),
        stats=SpeculationStats(jnp.int32(0), jnp.int32(0), zeros, zeros),
    )
    loop_key = None if key is None else jax.random.fold_in(key, 1)

    def cond(s: _SpecState):
        return ~jnp.all(s.done)

    def body(s: _SpecState) -> _SpecState:
        round_key = None if loop_key is None else jax.random.fold_in(loop_key, s.round)
        keys = (None, None) if round_key is None else tuple(jax.random.split(round_key))
        if lookup:
            proposals, count = spec.draft.propose(s.history, prompt_lengths + s.lengths, big_k)
        else:
            proposals, count = None, jnp.full((batch,), big_k, jnp.int32)
        choice = _choose(spec, s, count)

        branches = [functools.partial(_round, k, model, params, draft, draft_params, sampler, s.last, s.cache,
                                      s.draft_cache, proposals, count, keys, big_k + 1)
                    for k in spec.draft_lengths]
        r = lax.switch(choice, branches)
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
        speculated = choice > 0
        live = ~s.done
        stats = s.stats
        return _SpecState(
            round=s.round + 1,
            last=jnp.take_along_axis(emitted, (produced - 1)[:, None], axis=1)[:, 0],
            out=_write(s.out, emitted, s.lengths),
            lengths=new_lengths,
            done=s.done | finished,
            cache=r.cache,
            draft_cache=r.draft_cache,
            history=None if s.history is None else _write(s.history, emitted, prompt_lengths + s.lengths),
            accepted_ema=_DECAY * s.accepted_ema + jnp.sum(jnp.where(live, r.evidence, 0.0)),
            rejected_ema=_DECAY * s.rejected_ema + jnp.sum(jnp.where(live, r.trials - r.evidence, 0.0)),
            stats=SpeculationStats(
                passes=stats.passes + 1,
                verifies=stats.verifies + speculated.astype(jnp.int32),
                drafted=stats.drafted + jnp.where(live, r.drafted, 0),
                accepted=stats.accepted + jnp.where(live, r.accepted, 0),
            ),
        )

    final = lax.while_loop(cond, body, init)
    columns = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(columns < final.lengths[:, None], final.out[:, :max_new_tokens], pad_token_id)
    return tokens, final.lengths, final.stats


_ROUND_COSTS: dict[Any, tuple[float, ...]] = {}
_GREEDY = Greedy()


def measure_round_costs(
    model, params, prompt, speculative: Speculative, *, sampler=_GREEDY, draft_params=None, rounds: int = 16,
    repeats: int = 5,
) -> tuple[float, ...]:
    """Time a round of each of ``speculative.draft_lengths`` drafts on this machine, in plain decode steps.

    Each round kind (the code the loop runs: decode, or draft + verify + accept + commit) is compiled
    on its own as a ``fori_loop`` of ``rounds`` rounds from the cache after ``prompt`` (batch as given)
    and timed, the median of ``repeats``; the results are divided by the plain decode step's and rounded
    to 2 digits. Kept per model, sampler, draft, batch and parameter shapes for the process, so
    :func:`ssdkit.generate` measures once.
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

    def timed(k):
        def many(params, draft_params, cache, draft_cache):
            def one(_, carry):
                last, cache, draft_cache = carry
                r = _round(k, model, params, draft, draft_params, sampler, last, cache, draft_cache,
                           None if draft is not None else proposals, count, keys, big_k + 1)
                return r.emitted[:, 0], r.cache, r.draft_cache

            return lax.fori_loop(0, rounds, one, (prompt[:, -1], cache, draft_cache))

        run = jax.jit(many)
        jax.block_until_ready(run(params, draft_params, cache, draft_cache))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(run(params, draft_params, cache, draft_cache))
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    seconds = [timed(k) for k in speculative.draft_lengths]
    costs = tuple(max(round(t / seconds[0], 2), 0.01) for t in seconds)
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


def _write(buffer, values, at):
    """``buffer[b, at[b] : at[b] + w] = values[b]`` for every row (w = values' width; within the buffer)."""
    return jax.vmap(lambda row, v, i: lax.dynamic_update_slice(row, v, (i,)))(buffer, values, at)


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id", "speculative")
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

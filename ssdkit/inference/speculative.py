"""Speculative generation: the compiled loop behind ``ssdkit.generate(..., speculative=Speculative(...))``.

One ``lax.while_loop`` (no host round trip; the traced program does not grow with ``max_new_tokens``).
Its carry holds each row's last emitted token (not yet fed to the model), the cache after every earlier
token, the output buffer, for prompt lookup the row's text, and the plan for the next round (its k and
proposals). Plain rounds (k = 0) run in an inner ``while_loop`` of their own, as plain decoding does:
behind a conditional, XLA copies every layer's state each iteration (it cannot update a conditional's
operand in place), which on 130M cost 10-20% of a plain step. Only the other rounds (and feeding a draft
model's queue) sit behind the ``lax.switch``. A round:

1. proposes up to k tokens per row (a :class:`~ssdkit.inference.drafts.DraftSource`:
   :class:`~ssdkit.PromptLookup`, a :class:`~ssdkit.DraftModel`, or your own), with k chosen per round
   from the compiled lengths (``Speculative.draft_lengths``; k = 0 is a plain decode step) and their
   costs (``Speculative.round_costs``, or the deterministic estimate of ``ssdkit.inference.costs``);
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

Under a mesh (``jax.set_mesh``) the prefill splits the prompt over the ``seq`` axis as plain generation does;
everything after it (the rounds' verifies of k + 1 tokens, a draft model's queue, the cost estimate) is
traced inside :func:`ssdkit.core.mesh.unsplit_sequence`: such short sequences need no split (and k + 1
rarely divides into pieces of the conv's K - 1 inputs), so each ``seq`` device computes them whole.
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
from ssdkit.core.mesh import unsplit_sequence
from ssdkit.inference.costs import estimate_round_costs
from ssdkit.inference.drafts import Evidence, Speculative, write_rows
from ssdkit.inference.protocol import GenerationResult, SpeculationStats, prefill_and_sample, prepare_params
from ssdkit.inference.rounds import run_round
from ssdkit.inference.sampling import Greedy
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
    source: Any  # the draft source's state
    accepted_ema: Float[Array, ""]  # decayed counts of accepted and rejected drafts (the adaptive rule)
    rejected_ema: Float[Array, ""]
    stats: SpeculationStats
    # the next round's plan: index into Speculative.draft_lengths, and the source's candidates
    choice: Int[Array, ""]
    candidates: Any
    count: Lengths  # tokens each row could propose


_DECAY = 0.9  # per round: the weight of the past in the acceptance counts
_MARGIN = 1.1  # a round of drafts must promise this many times plain decoding's tokens per cost


def _choose(spec: Speculative, costs: tuple[float, ...], s: _SpecState, count) -> Int[Array, ""]:
    """Index into ``spec.draft_lengths`` of this round's draft length (the rule in :class:`Speculative`)."""
    lengths = spec.draft_lengths
    active = ~s.done
    can = jnp.any(active & (count > 0))
    if not spec.adaptive:
        return jnp.where(can, len(lengths) - 1, 0).astype(jnp.int32)
    alpha = (s.accepted_ema + 1.0) / (s.accepted_ema + s.rejected_ema + 2.0)  # prior 1/2, worth 2 drafts
    rows = jnp.maximum(jnp.sum(active), 1)
    gains = []
    for k, cost in zip(lengths, costs, strict=True):
        drafts = jnp.minimum(count, k)  # (batch,)
        expected = jnp.sum(jnp.where(active, (1 - alpha ** (drafts + 1)) / (1 - alpha), 0.0)) / rows
        gains.append(expected / cost)
    gains = jnp.stack(gains)
    choice = jnp.argmax(gains).astype(jnp.int32)
    choice = jnp.where(gains[choice] > _MARGIN * gains[0], choice, 0)  # speculate only for a clear gain
    return jnp.where(can, choice, 0).astype(jnp.int32)


def speculative_loop(
    model, params, draft_params, prompt, lengths, key, *, max_new_tokens: int, sampler, eos_token_id, pad_token_id,
    speculative: Speculative,
):
    """The traced body of speculative :func:`ssdkit.generate`: returns (tokens, lengths, stats)."""
    batch, prompt_len = prompt.shape
    spec, source = speculative, speculative.draft
    big_k = spec.draft_tokens
    room = max_new_tokens + big_k + 1  # a round writes k + 1 columns from each row's length
    prompt_lengths = jnp.full((batch,), prompt_len, jnp.int32) if lengths is None else lengths

    params = prepare_params(model, params)  # once, before the loop (e.g. per-layer weights for decode)
    draft_params = source.prepare(draft_params)
    token, logits, cache = prefill_and_sample(model, params, prompt, lengths, key, sampler)
    state = source.start(draft_params, prompt, lengths, token, room, big_k, logits.shape[-1])
    costs = spec.round_costs
    if spec.adaptive and costs is None:  # from the programs' shapes alone: no timing, no machine dependence
        with unsplit_sequence():  # the programs the rounds run (below)
            costs = estimate_round_costs(model, params, draft_params, cache, state, spec, sampler, batch)
    out = jnp.full((batch, room), pad_token_id, jnp.int32).at[:, 0].set(token)
    done = jnp.zeros((batch,), bool) if eos_token_id is None else token == eos_token_id
    done |= max_new_tokens <= 1

    def plan(s: _SpecState) -> _SpecState:
        """Decide the next round: the source's candidates and the draft length (``_choose``)."""
        candidates, count = source.candidates(s.source, prompt_lengths + s.lengths, big_k)
        return dataclasses.replace(s, choice=_choose(spec, costs, s, count), candidates=candidates, count=count)

    zeros = jnp.zeros((batch,), jnp.int32)
    first = _SpecState(
        round=jnp.int32(0), last=token, out=out, lengths=jnp.ones((batch,), jnp.int32), done=done, cache=cache,
        source=state, accepted_ema=jnp.float32(0), rejected_ema=jnp.float32(0),
        stats=SpeculationStats(jnp.int32(0), jnp.int32(0), zeros, zeros), choice=jnp.int32(0), candidates=None,
        count=zeros,
    )
    with unsplit_sequence():
        init = plan(first)
    loop_key = None if key is None else jax.random.fold_in(key, 1)

    def counted(s: _SpecState, evidence: Evidence, decay: float) -> dict:
        live = ~s.done
        rejected = evidence.trials - evidence.held
        return dict(accepted_ema=decay * s.accepted_ema + jnp.sum(jnp.where(live, evidence.held, 0.0)),
                    rejected_ema=decay * s.rejected_ema + jnp.sum(jnp.where(live, rejected, 0.0)))

    def one_round(k: int, s: _SpecState) -> _SpecState:
        """Round ``k`` (a plain step for 0), its tokens written, its evidence counted, the next one planned."""
        round_key = None if loop_key is None else jax.random.fold_in(loop_key, s.round)
        keys = (None, None) if round_key is None else tuple(jax.random.split(round_key))
        r = run_round(k, model, source, params, draft_params, sampler, s.last, s.cache, s.source, s.candidates,
                      s.count, keys, prompt_lengths + s.lengths, big_k + 1)
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
            out=write_rows(s.out, emitted, s.lengths),
            lengths=new_lengths,
            done=s.done | finished,
            cache=r.cache,
            source=r.source,
            **counted(s, r.evidence, _DECAY),
            stats=SpeculationStats(
                passes=stats.passes + 1,
                verifies=stats.verifies + int(k > 0),
                drafted=stats.drafted + jnp.where(live, r.drafted, 0),
                accepted=stats.accepted + jnp.where(live, r.accepted, 0),
            ),
        ))

    def catch_up(s: _SpecState) -> _SpecState:
        """The source takes in what it deferred (a draft model's full queue); what it would have guessed is
        evidence."""
        state, evidence = source.catch_up(s.source, draft_params, sampler, s.last)
        return plan(dataclasses.replace(s, source=state, **counted(s, evidence, 1.0)))

    def plain_runs(s: _SpecState) -> Any:
        return ~jnp.all(s.done) & (s.choice == 0) & ~source.behind(s.source)

    def cond(s: _SpecState):
        return ~jnp.all(s.done)

    def body(s: _SpecState) -> _SpecState:
        s = lax.while_loop(plain_runs, functools.partial(one_round, 0), s)
        # Out of the plain run: all rows done, the source behind, or a round of drafts planned.
        branches = [lambda s: s, catch_up] + [functools.partial(one_round, k) for k in spec.draft_lengths[1:]]
        index = jnp.where(jnp.all(s.done), 0, jnp.where(s.choice == 0, 1, s.choice + 1))
        return lax.switch(index, branches, s)

    with unsplit_sequence():  # past the prefill every sequence is short (module docstring)
        final = lax.while_loop(cond, body, init)
    columns = jnp.arange(max_new_tokens)[None, :]
    tokens = jnp.where(columns < final.lengths[:, None], final.out[:, :max_new_tokens], pad_token_id)
    return tokens, final.lengths, final.stats


def check_speculative(model, sampler, speculative, draft_params) -> None:
    """Raise a plain-words error unless the request can decode speculatively."""
    if not isinstance(speculative, Speculative):
        raise TypeError(f"speculative must be ssdkit.Speculative(...), got {speculative!r}")
    missing = [m for m in ("prefill", "decode", "verify", "commit") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(
            f"speculative decoding needs a model with verify(params, tokens, cache) and commit(record, "
            f"accepted) besides prefill / decode; {type(model).__name__} lacks {', '.join(missing)}"
        )
    if not isinstance(sampler, Greedy) and not callable(getattr(sampler, "filtered_logits", None)):
        raise TypeError(
            f"speculative sampling needs the sampler's distribution: use Greedy() or Sample(...) (a sampler with "
            f"filtered_logits), got {sampler!r}"
        )
    speculative.draft.check(draft_params)


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

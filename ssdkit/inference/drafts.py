"""Where speculative decoding's draft tokens come from, and how many to draft.

:class:`Speculative` configures :func:`ssdkit.generate`'s speculative loop (``ssdkit.inference.speculative``):
each round proposes up to ``draft_tokens`` tokens per row, the target model checks them all in one pass
(``verify``) and keeps the longest prefix it agrees with plus one token of its own (``commit``). A draft
source is a :class:`DraftSource`: a hashable object whose state rides in the loop's carry and which

* **proposes** k tokens for a round (with their distribution when it samples),
* **follows** the text through plain rounds (and says, for free, whether its guess would have held: the
  adaptive rule's evidence), and
* **rolls back** to the accepted prefix after a round of drafts.

Two sources ship:

* :class:`PromptLookup` — no extra model: the continuation of an earlier occurrence of the row's last n
  tokens in its prompt and generated text (n from ``max_ngram`` down to ``min_ngram``). Code,
  quoting and edits repeat themselves; random text does not, and then nothing is proposed.
* :class:`DraftModel` — any ssdkit model with ``prefill`` / ``decode`` / ``verify`` / ``commit`` and the
  target's vocabulary (e.g. a small Mamba-2 for a large one). It drafts with k decode steps from its own
  cache, which is then rolled to the accepted prefix the same way as the target's (one ``verify`` of the
  k tokens and a ``commit``); between drafting rounds it is fed the text in blocks.

A new source is a new class with these methods; the loop does not change.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from ssdkit._typing import Lengths, Logits, StepTokens, Tokens
from ssdkit.inference.protocol import SpeculativeModel, prepare_params
from ssdkit.inference.sampling import Greedy, token_probability


class Drafts(NamedTuple):
    """A round's proposals: ``tokens`` (batch, k); ``count`` (batch,) of them are real; ``log_q``
    (batch, k, vocab) the log-distribution they were drawn from (None: deterministic, one-hot)."""

    tokens: Int[Array, "batch k"]
    count: Lengths
    log_q: Float[Array, "batch k vocab"] | None


class Evidence(NamedTuple):
    """How often a first draft would have held, per row: ``held`` drafts (or chances) out of ``trials``
    (rejections plus accepted drafts: the counts of a geometric law). The adaptive rule's input."""

    held: Float[Array, " batch"]
    trials: Float[Array, " batch"]

    @staticmethod
    def none(batch: int) -> Evidence:
        zeros = jnp.zeros((batch,), jnp.float32)
        return Evidence(zeros, zeros)

    def plus(self, other: Evidence) -> Evidence:
        return Evidence(self.held + other.held, self.trials + other.trials)


class DraftSource(Protocol):
    """Where the speculative loop's drafts come from. Hashable (a static ``jit`` argument); every method is
    traced inside the loop, and ``state`` (any PyTree of arrays, fixed shapes) rides in its carry.

    ``params`` are the source's own (``generate(..., draft_params=)``; None for a source without a model).
    Positions: ``at`` (batch,) is where in the row's text (prompt, then emitted tokens) the written tokens
    go; ``last`` (batch,) is the row's last emitted token, not yet fed to the target.
    """

    def check(self, params: Any) -> None:
        """Raise a plain-words error unless ``params`` (``generate``'s ``draft_params``) suit this source."""
        ...

    def prepare(self, params: Any) -> Any:
        """``params`` in the layout the source reads fastest; called once per generation call, traced."""
        ...

    def start(self, params: Any, prompt: Tokens, lengths: Lengths | None, first: StepTokens, room: int,
              big_k: int, vocab: int) -> Any:
        """The state after the prompt (right-padded to ``lengths``) and the first emitted token; ``room``
        columns of text follow the prompt, ``vocab`` is the target's logits width."""
        ...

    def candidates(self, state: Any, at: Lengths, big_k: int) -> tuple[Int[Array, "batch K"] | None, Lengths]:
        """Before a round: proposals known without work (None if drafting computes them) and how many
        tokens each row could propose (the adaptive rule's ``c``)."""
        ...

    def follow(self, state: Any, params: Any, sampler, last: StepTokens, token: StepTokens, logits: Logits,
               candidates: Any, count: Lengths, at: Lengths) -> tuple[Any, Evidence]:
        """A plain round fed ``last`` to the target, which produced ``token`` from ``logits``: keep up with
        the text, and say whether this source's guess would have held."""
        ...

    def behind(self, state: Any) -> jax.Array:
        """True when the source must :meth:`catch_up` before the next plain round (a full queue)."""
        ...

    def catch_up(self, state: Any, params: Any, sampler, last: StepTokens) -> tuple[Any, Evidence]:
        """Take in whatever the source deferred while following (``last``: the token after it)."""
        ...

    def propose(self, state: Any, params: Any, sampler, last: StepTokens, k: int, key, candidates: Any,
                count: Lengths) -> tuple[Any, Drafts, Evidence]:
        """k drafts to follow ``last``."""
        ...

    def roll_back(self, state: Any, params: Any, fed: Tokens, kept: Lengths, emitted: Tokens,
                  at: Lengths) -> Any:
        """After a round of drafts: ``fed`` (batch, k + 1) were verified, the first ``kept`` of them stay;
        ``emitted`` (batch, k + 1) are the round's tokens, written at ``at``."""
        ...

    def round_costs(self, params: Any, state: Any, sampler, lengths: tuple[int, ...],
                    cost: Callable[..., float]) -> tuple[float, ...]:
        """This source's own work in a round of each of ``lengths`` drafts (0: following one plain round),
        in the units of ``cost(fn, *args)``, the estimated cost of running ``fn(*args)`` once
        (``ssdkit.inference.costs``; the arguments may be arrays or shapes). Deterministic: no timing."""
        ...


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Propose what followed the most recent earlier occurrence of the row's last n tokens (n-gram lookup).

    The longest n in ``max_ngram`` .. ``min_ngram`` with a match wins; among its matches, the one followed
    by the most known tokens (up to k), the most recent among those. A row whose last tokens occur nowhere
    earlier proposes nothing.
    """

    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        for name in ("max_ngram", "min_ngram"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"PromptLookup.{name} must be an integer >= 1, got {value!r}")
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"PromptLookup needs min_ngram <= max_ngram, got {self.min_ngram} > {self.max_ngram}")

    def lookup(
        self, history: Int[Array, "batch time"], length: Lengths, k: int
    ) -> tuple[Int[Array, "batch k"], Lengths]:
        """Up to ``k`` proposed tokens per row: ``(drafts (batch, k) int32, count (batch,))``.

        ``history[b, :length[b]]`` is row b's text so far (prompt, then generated tokens; its last token is
        the one about to be fed). ``drafts[b, :count[b]]`` continue the match; later entries are filler.
        O(time · max_ngram²) comparisons per row.
        """
        history = jnp.asarray(history, jnp.int32)
        batch, time = history.shape
        length = jnp.asarray(length, jnp.int32)
        positions = jnp.arange(time)
        best = jnp.full((batch,), -1, jnp.int32)  # end of the chosen match (-1: none yet)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            # The row's last n tokens, and for every end position i whether history[i-n+1 .. i] equals them.
            tail = jnp.take_along_axis(history, jnp.clip(length[:, None] - n + jnp.arange(n), 0, time - 1), axis=1)
            padded = jnp.pad(history, ((0, 0), (n - 1, 0)), constant_values=-1)
            match = jnp.ones((batch, time), bool)
            for j in range(n):
                match &= padded[:, j : j + time] == tail[:, j : j + 1]
            # Earlier occurrences only (they end before the last token), of a tail that exists.
            match &= (positions[None, :] < length[:, None] - 1) & (length[:, None] > n)
            # The match with the most continuation (up to k tokens), the most recent among equals.
            score = jnp.minimum(k, length[:, None] - 1 - positions[None, :]) * time + positions[None, :]
            end = jnp.argmax(jnp.where(match, score, -1), axis=1).astype(jnp.int32)
            best = jnp.where((best < 0) & jnp.any(match, axis=1), end, best)
        start = best + 1  # the continuation starts after the match; it may run up to the last token
        count = jnp.where(best >= 0, jnp.minimum(k, length - start), 0).astype(jnp.int32)
        drafts = jnp.take_along_axis(history, jnp.clip(start[:, None] + jnp.arange(k), 0, time - 1), axis=1)
        return drafts, count

    # ---- the DraftSource protocol: the state is the rows' text (batch, prompt + room), prompt then emitted
    def check(self, params):
        if params is not None:
            raise ValueError("draft_params is only for a source with a model, e.g. Speculative(draft=DraftModel(...)); "
                             "prompt lookup has no model")

    def prepare(self, params):
        return params

    def start(self, params, prompt, lengths, first, room, big_k, vocab):
        batch, prompt_len = prompt.shape
        at = jnp.full((batch,), prompt_len, jnp.int32) if lengths is None else lengths
        text = jnp.concatenate([prompt, jnp.zeros((batch, room), jnp.int32)], axis=1)
        return write_rows(text, first[:, None], at)

    def candidates(self, state, at, big_k):
        return self.lookup(state, at, big_k)

    def follow(self, state, params, sampler, last, token, logits, candidates, count, at):
        """Write ``token``; the evidence: would the first proposal have held (for sampling, its chance)."""
        guess = candidates[:, 0]
        chance = ((guess == token).astype(jnp.float32) if isinstance(sampler, Greedy)
                  else token_probability(sampler, logits, guess))
        evidence = Evidence(jnp.where(count > 0, chance, 0.0), (count > 0).astype(jnp.float32))
        return write_rows(state, token[:, None], at), evidence

    def behind(self, state):
        return jnp.bool_(False)

    def catch_up(self, state, params, sampler, last):
        return state, Evidence.none(state.shape[0])

    def propose(self, state, params, sampler, last, k, key, candidates, count):
        return state, Drafts(candidates[:, :k], jnp.minimum(count, k), None), Evidence.none(state.shape[0])

    def roll_back(self, state, params, fed, kept, emitted, at):
        return write_rows(state, emitted, at)

    def round_costs(self, params, state, sampler, lengths, cost):
        """The lookup runs before every round, plain or not (writes of the text are free next to it)."""
        at = jnp.zeros((state.shape[0],), jnp.int32)
        return (cost(lambda text, at: self.lookup(text, at, max(lengths)), state, at),) * len(lengths)


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A smaller model proposing tokens (its parameters go to ``generate(..., draft_params=...)``).

    ``model`` is a hashable :class:`SpeculativeModel` with the target's vocabulary (equal logits width).
    With a :class:`~ssdkit.Sample` sampler it drafts by sampling from its own distribution q under the
    same temperature / top-k / top-p, and the target accepts token t with probability min(1, p(t)/q(t)).

    It follows the text lazily: plain rounds queue their tokens, and the queue (:func:`queue_width`
    tokens) is fed in one ``verify`` + ``commit`` when full or before the next round of drafts.
    """

    model: Any

    # ---- the DraftSource protocol: the state is the draft's cache and its queue (_DraftState)
    def check(self, params):
        missing = [m for m in ("prefill", "decode", "verify", "commit") if not callable(getattr(self.model, m, None))]
        if missing:
            raise TypeError(
                f"speculative decoding needs a draft model with verify(params, tokens, cache) and commit(record, "
                f"accepted) besides prefill / decode; {type(self.model).__name__} lacks {', '.join(missing)}"
            )
        try:
            hash(self.model)
        except TypeError:
            raise TypeError("DraftModel.model must be hashable (a frozen dataclass): it is a static jit argument") \
                from None
        if params is None:
            raise ValueError("a DraftModel needs its parameters: pass draft_params=")

    def prepare(self, params):
        return prepare_params(self.model, params)

    def start(self, params, prompt, lengths, first, room, big_k, vocab):
        logits, cache = (self.model.prefill(params, prompt) if lengths is None
                         else self.model.prefill(params, prompt, lengths=lengths))
        if logits.shape[-1] != vocab:
            raise ValueError(
                f"the draft model's logits have {logits.shape[-1]} entries, the target's {vocab}: a draft model "
                f"needs the target's vocabulary (the same logits width)"
            )
        batch, width = prompt.shape[0], queue_width(big_k)
        return _DraftState(cache=cache, pending=jnp.zeros((batch, width), jnp.int32),
                           pending_n=jnp.zeros((batch,), jnp.int32), pending_p=jnp.ones((batch, width), jnp.float32))

    def candidates(self, state, at, big_k):
        return None, jnp.full(at.shape, big_k, jnp.int32)

    def follow(self, state, params, sampler, last, token, logits, candidates, count, at):
        """Queue ``last`` (fed with the rest of the queue later); the evidence is counted then."""
        d = state
        p_token = token_probability(sampler, logits, token)
        queued = dataclasses.replace(d, pending=write_rows(d.pending, last[:, None], d.pending_n),
                                     pending_p=write_rows(d.pending_p, p_token[:, None], d.pending_n),
                                     pending_n=d.pending_n + 1)
        return queued, Evidence.none(last.shape[0])

    def behind(self, state):
        return jnp.any(state.pending_n >= state.pending.shape[1])

    def catch_up(self, state, params, sampler, last):
        """Feed the queue in one verify + commit; the evidence: how many of its tokens the draft would have
        guessed (its logits there are free)."""
        d = state
        logits, record = self.model.verify(params, d.pending, d.cache)
        cache = self.model.commit(record, d.pending_n)
        columns = jnp.arange(d.pending.shape[1])[None, :]
        last_pending = columns == (d.pending_n - 1)[:, None]
        actual = jnp.where(last_pending, last[:, None], jnp.roll(d.pending, -1, axis=1))  # what followed each
        if isinstance(sampler, Greedy):
            chance = (sampler(logits) == actual).astype(jnp.float32)
        else:  # E over the target's draws t of min(1, q(t) / p(t)) is Σ_v min(p_v, q_v), the acceptance chance
            log_q = jax.nn.log_softmax(sampler.filtered_logits(logits), axis=-1)
            q = jnp.exp(jnp.take_along_axis(log_q, actual[..., None], axis=-1)[..., 0])
            chance = jnp.minimum(1.0, q / jnp.maximum(d.pending_p, 1e-30))
        valid = columns < d.pending_n[:, None]
        emptied = dataclasses.replace(d, cache=cache, pending_n=jnp.zeros_like(d.pending_n))
        return emptied, Evidence(jnp.sum(jnp.where(valid, chance, 0.0), axis=1), d.pending_n.astype(jnp.float32))

    def propose(self, state, params, sampler, last, k, key, candidates, count):
        """Feed the queue if anything waits, then k decode steps of the draft from its cache."""
        def nothing(d):
            return d, Evidence.none(last.shape[0])

        state, evidence = lax.cond(jnp.any(state.pending_n > 0),
                                   lambda d: self.catch_up(d, params, sampler, last), nothing, state)
        tokens, log_q = draft_with_model(self.model, params, state.cache, last, k, sampler, key)
        return state, Drafts(tokens, jnp.full(last.shape, k, jnp.int32), log_q), evidence

    def roll_back(self, state, params, fed, kept, emitted, at):
        _, record = self.model.verify(params, fed, state.cache)
        return dataclasses.replace(state, cache=self.model.commit(record, kept))

    def round_costs(self, params, state, sampler, lengths, cost):
        """k draft decode steps and a verify + commit of k + 1 tokens (linear in k between the shortest and
        the longest round's); a plain round: 1/width of feeding a full queue of ``width`` tokens."""
        batch, width = state.pending.shape
        verify = verify_cost(self.model, params, state.cache, batch, cost)
        step = cost(self.model.decode, params, jax.ShapeDtypeStruct((batch,), jnp.int32), state.cache)
        fed = verify((width,))[0] / width
        drafting = verify(tuple(k + 1 for k in lengths if k > 0))
        return (fed, *(k * step + v for k, v in zip((k for k in lengths if k > 0), drafting, strict=True)))


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


def queue_width(big_k: int) -> int:
    """Tokens a draft model's queue holds: fed in one verify when full, so the draft follows plain rounds
    at the cost of one weight pass per this many tokens (4 × (K + 1): with 9, a 20-layer 130M draft that
    never held cost 15% of a plain step per token)."""
    return 4 * (big_k + 1)


def verify_cost(model: SpeculativeModel, params, cache, batch: int, cost: Callable[..., float]):
    """``costs(widths)``: the estimated cost of ``model``'s verify + commit of each of ``widths`` tokens per
    row, from ``cost`` of the shortest and the longest width and linear between them (the programs' bytes
    and FLOPs grow linearly with the width), so two programs are lowered whatever the widths."""
    def verify_commit(params, tokens, cache):
        _, record = model.verify(params, tokens, cache)
        return model.commit(record, jnp.full((batch,), tokens.shape[1], jnp.int32))

    def at(width):
        return cost(verify_commit, params, jax.ShapeDtypeStruct((batch, width), jnp.int32), cache)

    def costs(widths: tuple[int, ...]) -> tuple[float, ...]:
        lo, hi = min(widths), max(widths)
        c_lo = at(lo)
        c_hi = c_lo if hi == lo else at(hi)
        return tuple(c_lo + (c_hi - c_lo) * (w - lo) / max(hi - lo, 1) for w in widths)

    return costs


def write_rows(buffer, values, at):
    """``buffer[b, at[b] : at[b] + w] = values[b]`` for every row (w = values' width; within the buffer)."""
    return jax.vmap(lambda row, v, i: lax.dynamic_update_slice(row, v, (i,)))(buffer, values, at)


_SOURCE_METHODS = ("check", "prepare", "start", "candidates", "follow", "behind", "catch_up", "propose", "roll_back",
                   "round_costs")


@dataclasses.dataclass(frozen=True)
class Speculative:
    """Speculative decoding settings for :func:`ssdkit.generate`.

    Attributes:
        draft: the :class:`DraftSource`: :class:`PromptLookup` (default), :class:`DraftModel`, or your own.
        draft_tokens: K, the most tokens proposed per round (static; the loop compiles rounds of
            0, 1, 2, 4, ... and K drafts).
        adaptive: choose each round's draft length from the acceptance seen so far (below); False
            always drafts K (and decodes plainly only when lookup finds nothing).
        round_costs: the cost of a round of each of :attr:`draft_lengths` drafts, in plain decode steps
            (the first is 1). None (the default): estimated while the loop is traced from the bytes and
            FLOPs of the programs a round runs (XLA's cost analysis, ``ssdkit.inference.costs``): a pure
            function of the models, shapes and backend, so the same key gives the same tokens on every
            machine. ``ssdkit.inference.costs.measure_round_costs`` times them on this machine instead,
            for callers who want that (and accept that the draft lengths then depend on the timing).

    The adaptive rule: α, the chance that a drafted token holds, is estimated from decayed counts (a
    weight of 0.9 per round, prior 1/2): the drafts verified, and in plain rounds, for free, whether the
    source's guess at the token the target produced would have held (lookup's first proposal; the draft
    model's prediction, which it makes anyway while following the text). A round of k drafts is expected
    to emit Σ_{i=0..min(k, c)} α^i tokens (c: the tokens the source could propose) at a cost of
    ``round_costs[k]``; the round takes the k with the most tokens per cost, averaged over the rows still
    generating, if that beats a plain decode step (k = 0) by 10% (costs are estimates).

    A draft model follows the text lazily: plain rounds queue their tokens and feed it K + 1 at a time
    in one ``verify`` (whose logits are the evidence: would it have guessed them?), so drafts that never
    hold cost about one draft pass per K + 1 tokens.
    """

    draft: DraftSource = PromptLookup()
    draft_tokens: int = 8
    adaptive: bool = True
    round_costs: tuple[float, ...] | None = None

    def __post_init__(self):
        missing = [m for m in _SOURCE_METHODS if not callable(getattr(self.draft, m, None))]
        if missing:
            raise TypeError(f"Speculative.draft must be a DraftSource such as PromptLookup(...) or DraftModel(model) "
                            f"(lacking {', '.join(missing)}), got {self.draft!r}")
        try:
            hash(self.draft)
        except TypeError:
            raise TypeError(f"Speculative.draft must be hashable (a frozen dataclass): it is a static jit argument; "
                            f"got {self.draft!r}") from None
        k = self.draft_tokens
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= 64:
            raise ValueError(f"Speculative.draft_tokens must be an integer in 1..64, got {k!r}")
        if self.round_costs is not None:
            costs = tuple(self.round_costs)
            if len(costs) != len(self.draft_lengths) or not all(
                    isinstance(c, numbers.Real) and not isinstance(c, bool) and c > 0 and math.isfinite(c)
                    for c in costs):
                raise ValueError(f"Speculative.round_costs must be {len(self.draft_lengths)} finite numbers > 0, one "
                                 f"per draft length {self.draft_lengths}, got {self.round_costs!r}")
            object.__setattr__(self, "round_costs", tuple(float(c) for c in costs))
        object.__setattr__(self, "adaptive", bool(self.adaptive))

    @property
    def draft_lengths(self) -> tuple[int, ...]:
        """The draft lengths the loop compiles a round for (0 is a plain decode step)."""
        if not self.adaptive:
            return (0, self.draft_tokens)
        powers = [1 << i for i in range(self.draft_tokens.bit_length()) if 1 << i < self.draft_tokens]
        return (0, *powers, self.draft_tokens)


def draft_with_model(
    draft: SpeculativeModel, params: Any, cache: Any, last: StepTokens, k: int, sampler, key
) -> tuple[Int[Array, "batch k"], Logits | None]:
    """k tokens from the draft model by k decode steps from ``cache`` fed ``last`` first.

    Returns the drafts and, when ``sampler`` samples, the (batch, k, vocab) float32 log-probabilities they
    were drawn from (None for greedy drafts). ``cache`` itself is not kept: the caller rolls it forward
    to the accepted prefix with ``verify`` / ``commit``.
    """
    greedy = isinstance(sampler, Greedy)

    def step(carry, t):
        token, cache = carry
        logits, cache = draft.decode(params, token, cache)
        if greedy:
            nxt, logq = sampler(logits), None
        else:
            logq = jax.nn.log_softmax(sampler.filtered_logits(logits), axis=-1)
            nxt = jax.random.categorical(jax.random.fold_in(key, t), logq, axis=-1).astype(jnp.int32)
        return (nxt, cache), (nxt, logq)

    _, (drafts, logq) = jax.lax.scan(step, (last, cache), jnp.arange(k))
    drafts = drafts.T
    return drafts, (None if logq is None else jnp.swapaxes(logq, 0, 1))

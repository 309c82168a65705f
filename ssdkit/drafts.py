"""Where speculative decoding's draft tokens come from, and how many to draft.

:class:`Speculative` configures :func:`ssdkit.generate`'s speculative loop (``ssdkit.speculative_loop``):
each round proposes up to ``draft_tokens`` tokens per row, the target model checks them all in one pass
(``verify``) and keeps the longest prefix it agrees with plus one token of its own (``commit``). Two
sources of proposals:

* :class:`PromptLookup` — no extra model: the continuation of an earlier occurrence of the row's last n
  tokens in its prompt and generated text (n from ``max_ngram`` down to ``min_ngram``). Code,
  quoting and edits repeat themselves; random text does not, and then nothing is proposed.
* :class:`DraftModel` — any ssdkit model with ``prefill`` / ``decode`` / ``verify`` / ``commit`` and the
  target's vocabulary (e.g. a small Mamba-2 for a large one). It drafts with k decode steps from its own
  cache, which is then rolled to the accepted prefix the same way as the target's (one ``verify`` of the
  k tokens and a ``commit``); between drafting rounds it is fed the text in blocks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ssdkit._typing import Lengths, Logits, SeqLogits, StepTokens, Tokens
from ssdkit.generate import Greedy, LanguageModel


class SpeculativeModel(LanguageModel, Protocol):
    """A :class:`~ssdkit.LanguageModel` that can check k tokens at once and keep any prefix of them."""

    def verify(self, params: Any, tokens: Tokens, cache: Any) -> tuple[SeqLogits, Any]:
        """Feed (batch, k) tokens from ``cache``: the logits after each (batch, k, vocab) and a record."""
        ...

    def commit(self, record: Any, accepted: Lengths) -> Any:
        """The cache after the first ``accepted[b]`` (0..k) of the verified tokens of each row."""
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

    def propose(
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


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A smaller model proposing tokens (its parameters go to ``generate(..., draft_params=...)``).

    ``model`` is a hashable :class:`SpeculativeModel` with the target's vocabulary (equal logits width).
    With a :class:`~ssdkit.Sample` sampler it drafts by sampling from its own distribution q under the
    same temperature / top-k / top-p, and the target accepts token t with probability min(1, p(t)/q(t)).
    """

    model: Any


@dataclasses.dataclass(frozen=True)
class Speculative:
    """Speculative decoding settings for :func:`ssdkit.generate`.

    Attributes:
        draft: :class:`PromptLookup` (default) or :class:`DraftModel`.
        draft_tokens: K, the most tokens proposed per round (static; the loop compiles rounds of
            0, 1, 2, 4, ... and K drafts).
        adaptive: choose each round's draft length from the acceptance seen so far (below); False
            always drafts K (and decodes plainly only when lookup finds nothing).
        round_costs: the cost of a round of each of :attr:`draft_lengths` drafts, in plain decode steps
            (the first is 1). None (the default): :func:`ssdkit.generate` measures them once per model,
            parameter shapes, batch and sampler in the process (a few seconds of compiling and timing,
            ``ssdkit.speculative_loop.measure_round_costs``) and keeps them; give them to skip that.

    The adaptive rule: α, the chance that a drafted token holds, is estimated from decayed counts (a
    weight of 0.9 per round, prior 1/2): the drafts verified, and in plain rounds, for free, whether the
    source's guess at the token the target produced would have held (lookup's first proposal; the draft
    model's prediction, which it makes anyway while following the text). A round of k drafts is expected
    to emit Σ_{i=0..min(k, c)} α^i tokens (c: the tokens the source could propose) at a cost of
    ``round_costs[k]``; the round takes the k with the most tokens per cost, averaged over the rows still
    generating, if that beats a plain decode step (k = 0) by 10% (measured costs vary that much).

    A draft model follows the text lazily: plain rounds queue their tokens and feed it K + 1 at a time
    in one ``verify`` (whose logits are the evidence: would it have guessed them?), so drafts that never
    hold cost about one draft pass per K + 1 tokens.
    """

    draft: PromptLookup | DraftModel = PromptLookup()
    draft_tokens: int = 8
    adaptive: bool = True
    round_costs: tuple[float, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.draft, (PromptLookup, DraftModel)):
            raise TypeError(f"Speculative.draft must be PromptLookup(...) or DraftModel(model), got {self.draft!r}")
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

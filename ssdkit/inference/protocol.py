"""What the generation loops need of a model, and what they return.

A model is a hashable object (a frozen dataclass, so the model itself is a static ``jit`` argument) with::

    prefill(params, tokens (batch, seq) int32[, lengths=(batch,) int32]) -> (last_logits (batch, vocab), cache)
    decode(params, token (batch,) int32, cache)                           -> (logits (batch, vocab), cache)

and, for speculative decoding (:class:`SpeculativeModel`)::

    verify(params, tokens (batch, k) int32, cache) -> (logits (batch, k, vocab), record)
    commit(record, accepted (batch,) int32)        -> cache after the first accepted[b] of the k tokens

``prefill`` gets ``lengths`` (by keyword) only when the caller gives prompt lengths, so models without
padding support work unchanged; with lengths, ``last_logits[b]`` are the logits after token
``lengths[b] - 1`` of row ``b``. ``decode`` must return a cache of the same structure, shapes and dtypes
as the one it was given (it is a ``lax.while_loop`` carry).

A model may also define ``prepare(params) -> params``: the parameters in the layout its decode reads
fastest. The loops call it once per generation call (inside the compiled program, before the decode
loop; :func:`prepare_params`), so a user's params work fast in any layout and nothing is kept between
calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ssdkit._typing import Lengths, Logits, SeqLogits, StepTokens, Tokens
from ssdkit.inference.sampling import sample_tokens


class LanguageModel(Protocol):
    """What :func:`generate` needs of a model. Implementations must be hashable (frozen dataclasses)."""

    def prefill(self, params: Any, tokens: Tokens, lengths: Lengths | None = None) -> tuple[Logits, Any]:
        """Run the prompt; return the logits after each row's last prompt token, and the cache."""
        ...

    def decode(self, params: Any, token: StepTokens, cache: Any) -> tuple[Logits, Any]:
        """Feed one token per row; return the next logits and the updated cache."""
        ...


class SpeculativeModel(LanguageModel, Protocol):
    """A :class:`LanguageModel` that can check k tokens at once and keep any prefix of them."""

    def verify(self, params: Any, tokens: Tokens, cache: Any) -> tuple[SeqLogits, Any]:
        """Feed (batch, k) tokens from ``cache``: the logits after each (batch, k, vocab) and a record."""
        ...

    def commit(self, record: Any, accepted: Lengths) -> Any:
        """The cache after the first ``accepted[b]`` (0..k) of the verified tokens of each row."""
        ...


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculationStats:
    """What the speculative loop did (in :class:`~ssdkit.GenerationResult`.speculation).

    Attributes:
        passes: target model passes after the prefill (plain decode steps plus verifies).
        verifies: those of the passes that checked drafts.
        drafted: (batch,) draft tokens checked per row.
        accepted: (batch,) of them accepted.
    """

    passes: Int[Array, ""]
    verifies: Int[Array, ""]
    drafted: Lengths
    accepted: Lengths

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens over all rows (0 when nothing was drafted)."""
        drafted = int(jnp.sum(self.drafted))
        return float(jnp.sum(self.accepted)) / drafted if drafted else 0.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """The output of :func:`generate`.

    Attributes:
        tokens: (batch, max_new_tokens) int32 generated ids; positions after a row's EOS (and after
            the loop ended) hold ``pad_token_id``.
        lengths: (batch,) int32 number of generated tokens of each row, its EOS included.
        speculation: what speculative decoding did (None for plain decoding).
    """

    tokens: Int[Array, "batch new"]
    lengths: Lengths
    speculation: SpeculationStats | None = None


def prefill_logits(model: LanguageModel, params: Any, prompt: Tokens, lengths: Lengths | None) -> tuple[Logits, Any]:
    """Prefill (``lengths`` passed only when given): the last logits, checked to be (batch, vocab), and the
    cache."""
    if lengths is None:
        logits, cache = model.prefill(params, prompt)
    else:
        logits, cache = model.prefill(params, prompt, lengths=lengths)
    batch = prompt.shape[0]
    if jnp.ndim(logits) != 2 or jnp.shape(logits)[0] != batch:
        raise ValueError(
            f"model.prefill must return last logits of shape (batch, vocab) = ({batch}, vocab), got "
            f"{jnp.shape(logits)}"
        )
    return logits, cache


def prefill_and_sample(model, params, prompt, lengths, key, sampler):
    """Prefill (:func:`prefill_logits`) and sample token 0 from the last logits."""
    logits, cache = prefill_logits(model, params, prompt, lengths)
    return sample_tokens(sampler, logits, key, 0, prompt.shape[0]), logits, cache


def prepare_params(model, params):
    """``model.prepare(params)`` if the model defines it (the layout its decode reads fastest), else
    ``params``. Called once per generation call, before the decode loop."""
    prepare = getattr(model, "prepare", None)
    return params if prepare is None else prepare(params)

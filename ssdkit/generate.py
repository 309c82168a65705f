"""The compiled generation loop and samplers, generic over any model.

A model is a hashable object (a frozen dataclass) with::

    prefill(params, tokens (batch, seq) int32[, lengths (batch,)]) -> (last_logits (batch, vocab), cache)
    decode(params, token (batch,) int32, cache)                    -> (logits (batch, vocab), cache)

:func:`generate` compiles prefill and the whole decode loop into ONE program: a ``lax.while_loop``
whose carry is (step, last token, output buffer, done flags, lengths, cache). Sampling happens inside
the loop with the key ``fold_in(key, step)``; ``max_new_tokens`` only sizes the output buffer, so the
traced program does not grow with it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Int

from ssdkit._typing import Lengths, Logits, StepTokens, Tokens
from ssdkit.dtypes import check_integer, check_lengths


class LanguageModel(Protocol):
    """What :func:`generate` needs of a model. Implementations must be hashable."""

    def prefill(self, params: Any, tokens: Tokens, lengths: Lengths | None = None) -> tuple[Logits, Any]: ...

    def decode(self, params: Any, token: StepTokens, cache: Any) -> tuple[Logits, Any]: ...


# ------------------------------------------------------------------------------ samplers
@dataclasses.dataclass(frozen=True)
class Greedy:
    """argmax of the logits."""

    def __call__(self, logits: Logits, key: jax.Array | None) -> StepTokens:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Temperature sampling, optionally restricted to the top-k tokens and then to the nucleus top-p
    (the smallest set of most likely tokens whose probability reaches p; the top token always stays)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        _check_sampling(self.temperature, self.top_k, self.top_p)
        if self.temperature == 0:
            raise ValueError("Sample needs temperature > 0; use Greedy() for temperature 0")

    def __call__(self, logits: Logits, key: jax.Array) -> StepTokens:
        logits = logits.astype(jnp.float32) / self.temperature
        vocab = logits.shape[-1]
        if self.top_k is not None and self.top_k < vocab:
            kth = lax.top_k(logits, self.top_k)[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p is not None and self.top_p < 1.0:
            order = jnp.argsort(-logits, axis=-1)
            sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly better tokens
            drop_sorted = mass_before >= self.top_p
            drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
            logits = jnp.where(drop, -jnp.inf, logits)
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


Sampler = Greedy | Sample


def _check_sampling(temperature, top_k, top_p) -> None:
    if not isinstance(temperature, int | float) or not temperature >= 0 or temperature == float("inf"):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None) -> Sampler:
    """Greedy for temperature 0, else :class:`Sample`; validates every parameter."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return Greedy()
    return Sample(float(temperature), top_k, None if top_p is None else float(top_p))


# ------------------------------------------------------------------------------ the loop
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Generated ids (batch, max_new_tokens) int32, pad after a row's EOS; lengths (batch,) int32
    count each row's generated tokens including its EOS."""

    tokens: Int[Array, "batch new"]
    lengths: Int[Array, " batch"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    step: jax.Array  # () int32: tokens written so far
    token: jax.Array  # (batch,) last sampled token
    tokens: jax.Array  # (batch, max_new_tokens)
    done: jax.Array  # (batch,) bool
    lengths: jax.Array  # (batch,) int32
    cache: Any


def _step_key(key, step):
    return None if key is None else jax.random.fold_in(key, step)


def _accept(state_tokens, done, lengths, token, step, eos_token_id, pad_token_id):
    """Write ``token`` at ``step`` for rows still running; update done flags and lengths."""
    token = jnp.where(done, jnp.int32(pad_token_id), token)
    tokens = lax.dynamic_update_slice_in_dim(state_tokens, token[:, None], step, axis=1)
    lengths = lengths + (~done).astype(jnp.int32)
    if eos_token_id is not None:
        done = done | (token == eos_token_id)
    return tokens, done, lengths, token


def _prefill_and_sample(model, params, prompt, lengths, key, sampler):
    if lengths is None:
        logits, cache = model.prefill(params, prompt)
    else:
        logits, cache = model.prefill(params, prompt, lengths)
    return sampler(logits, _step_key(key, 0)), cache


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id")
)
def _generate(model, params, prompt, lengths, key, *, max_new_tokens, sampler, eos_token_id, pad_token_id):
    batch = prompt.shape[0]
    first, cache = _prefill_and_sample(model, params, prompt, lengths, key, sampler)
    buf = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
    tokens, done, lens, first = _accept(buf, jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32),
                                        first, 0, eos_token_id, pad_token_id)
    state = _LoopState(jnp.int32(1), first, tokens, done, lens, cache)

    def cond(s: _LoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState):
        logits, cache = model.decode(params, s.token, s.cache)
        token = sampler(logits, _step_key(key, s.step))
        tokens, done, lens, token = _accept(s.tokens, s.done, s.lengths, token, s.step, eos_token_id,
                                            pad_token_id)
        return _LoopState(s.step + 1, token, tokens, done, lens, cache)

    final = lax.while_loop(cond, body, state)
    return GenerationResult(tokens=final.tokens, lengths=final.lengths)


def _validate(prompt, max_new_tokens, sampler, key, prompt_lengths):
    check_integer("prompt", prompt)
    if np.ndim(prompt) != 2 or 0 in np.shape(prompt):
        raise ValueError(f"prompt must have shape (batch, seq) with batch, seq >= 1, got {np.shape(prompt)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(sampler, Greedy | Sample):
        raise TypeError(f"sampler must be Greedy() or Sample(...), got {sampler!r}")
    if key is None and not isinstance(sampler, Greedy):
        raise ValueError("sampling needs a PRNG key: pass key=jax.random.key(seed)")
    if prompt_lengths is not None:
        check_lengths("prompt_lengths", prompt_lengths, *np.shape(prompt))


def generate(
    model: LanguageModel,
    params: Any,
    prompt: Tokens,
    *,
    max_new_tokens: int,
    sampler: Sampler = Greedy(),
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    prompt_lengths: Lengths | None = None,
    pad_token_id: int = 0,
) -> GenerationResult:
    """Prefill ``prompt`` and generate up to ``max_new_tokens`` per row, in one compiled device call.

    The first token is sampled from the prefill's last logits, each later one from a decode step; the
    step-i token uses the key ``fold_in(key, i)``. A row is done after it emits ``eos_token_id``; its
    later positions hold ``pad_token_id``. The loop ends when every row is done.
    """
    _validate(prompt, max_new_tokens, sampler, key, prompt_lengths)
    return _generate(model, params, jnp.asarray(prompt, jnp.int32),
                     None if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32), key,
                     max_new_tokens=max_new_tokens, sampler=sampler, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id)


@functools.partial(jax.jit, static_argnames=("model", "sampler"))
def _stream_first(model, params, prompt, lengths, key, sampler):
    return _prefill_and_sample(model, params, prompt, lengths, key, sampler)


@functools.partial(jax.jit, static_argnames=("model", "sampler"), donate_argnames=("cache",))
def _stream_next(model, params, token, cache, key, step, sampler):
    logits, cache = model.decode(params, token, cache)
    return sampler(logits, _step_key(key, step)), cache


def generate_stream(
    model: LanguageModel,
    params: Any,
    prompt: Tokens,
    *,
    max_new_tokens: int,
    sampler: Sampler = Greedy(),
    key: jax.Array | None = None,
    eos_token_id: int | None = None,
    prompt_lengths: Lengths | None = None,
    pad_token_id: int = 0,
) -> Iterator[StepTokens]:
    """Yield each step's (batch,) tokens as they are produced (one device call per token, for
    interactive use). Same tokens and key schedule as :func:`generate`; rows that are done yield
    ``pad_token_id``; stops early when every row is done."""
    _validate(prompt, max_new_tokens, sampler, key, prompt_lengths)
    lengths = None if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    token, cache = _stream_first(model, params, jnp.asarray(prompt, jnp.int32), lengths, key, sampler)
    done = np.zeros(np.shape(prompt)[0], bool)
    for step in range(max_new_tokens):
        if step:
            token, cache = _stream_next(model, params, token, cache, key, jnp.int32(step), sampler)
        host = np.where(done, pad_token_id, np.asarray(token))
        yield jnp.asarray(host, jnp.int32)
        if eos_token_id is not None:
            done |= host == eos_token_id
            if done.all():
                return

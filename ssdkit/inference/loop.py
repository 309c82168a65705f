"""The compiled generation loop, generic over any model (``ssdkit.inference.protocol``).

:func:`generate` compiles prefill and the whole decode loop into ONE program. Token 0 is sampled from the
prefill's last logits; then a ``lax.while_loop`` whose carry is (step, last token, output buffer, done
flags, lengths, cache) runs decode + sample and writes token ``i`` into a preallocated
(batch, max_new_tokens) buffer. ``max_new_tokens`` only sizes that buffer: the traced program does not
grow with it. Token ``i`` is sampled with the key ``fold_in(key, i)`` (``ssdkit.inference.sampling``). A
row is done after it emits ``eos_token_id``; its later positions hold ``pad_token_id``; the loop ends when
every row is done or ``max_new_tokens`` tokens are written. :func:`generate_stream` yields the same tokens
one device call per step, for interactive use. With ``speculative=``, :func:`generate` runs the
speculative loop instead (``ssdkit.inference.speculative``). :func:`lower_generate` gives the very program
:func:`generate` runs for a request, traced and lowered ahead of time, to compile and run as two steps
(``ssdkit generate`` reports compilation apart this way).

With active ``penalties=`` (:class:`~ssdkit.inference.sampling.Penalties`), every token, token 0 included,
is drawn from :func:`~ssdkit.inference.sampling.penalize`'s logits rather than the model's, and then
counted: the carry also holds what the penalties read, ``counts[b, v]`` (times row ``b`` has generated
token ``v``; a finished row counts nothing more) and ``prompt_mask[b, v]`` (``v`` is among row ``b``'s
first ``prompt_lengths[b]`` prompt tokens), both (batch, vocab) over the logits' last axis (a padded
vocabulary included). Without them (None or ``Penalties()``) the program is the plain one, with no such
carry.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Int

from ssdkit._typing import Lengths, StepTokens, Tokens
from ssdkit.dtypes import check_integer, check_lengths
from ssdkit.inference.drafts import Speculative
from ssdkit.inference.protocol import (
    GenerationResult,
    LanguageModel,
    prefill_and_sample,
    prefill_logits,
    prepare_params,
)
from ssdkit.inference.sampling import Greedy, Penalties, Sampler, penalize, sample_tokens
from ssdkit.inference.speculative import check_speculative, generate_speculative
from ssdkit.xla_options import inference_jit

_INT32 = np.iinfo(np.int32)


# ------------------------------------------------------------------------------ penalties
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Seen:
    """What :func:`penalize` reads of each row: the tokens it generated and the tokens of its prompt."""

    counts: Int[Array, "batch vocab"]  # times row b generated token v
    prompt_mask: Bool[Array, "batch vocab"]  # token v is in row b's prompt (padding excluded)


def _prompt_mask(prompt, lengths, width: int) -> Bool[Array, "batch vocab"]:
    """``mask[b, v]``: token ``v`` occurs in ``prompt[b, :lengths[b]]`` (the whole row without lengths)."""
    batch, seq = prompt.shape
    if lengths is not None:  # padding positions point past the vocabulary: dropped by the scatter
        prompt = jnp.where(jnp.arange(seq) < lengths[:, None], prompt, width)
    return jnp.zeros((batch, width), bool).at[jnp.arange(batch)[:, None], prompt].set(True, mode="drop")


def _penalized_token(sampler, logits, key, step, seen: _Seen, penalties: Penalties, live) -> tuple:
    """Token ``step`` drawn from ``penalize(logits, seen...)``, and ``seen`` with it counted where ``live``
    (a finished row's tokens are pad and count for nothing)."""
    batch = logits.shape[0]
    per_row = functools.partial(jnp.full, (batch,), dtype=jnp.float32)
    logits = penalize(logits, seen.counts, seen.prompt_mask, per_row(penalties.repetition),
                      per_row(penalties.presence), per_row(penalties.frequency))
    token = sample_tokens(sampler, logits, key, step, batch)
    counts = seen.counts.at[jnp.arange(batch), token].add(live.astype(jnp.int32))
    return token, dataclasses.replace(seen, counts=counts)


def _first_token(model, params, prompt, lengths, key, sampler, penalties: Penalties | None) -> tuple:
    """Prefill and sample token 0: (token, logits, cache, seen); ``seen`` is None without penalties (and the
    program then the plain prefill + sample)."""
    if penalties is None:
        return (*prefill_and_sample(model, params, prompt, lengths, key, sampler), None)
    logits, cache = prefill_logits(model, params, prompt, lengths)
    width = logits.shape[-1]
    seen = _Seen(jnp.zeros(logits.shape, jnp.int32), _prompt_mask(prompt, lengths, width))
    token, seen = _penalized_token(sampler, logits, key, 0, seen, penalties, jnp.ones(logits.shape[:1], bool))
    return token, logits, cache, seen


def _next_token(sampler, logits, key, step, seen: _Seen | None, penalties: Penalties | None, done) -> tuple:
    """Token ``step`` for a decode step's logits, and ``seen`` after it (None without penalties)."""
    if penalties is None:
        return sample_tokens(sampler, logits, key, step, logits.shape[0]), None
    return _penalized_token(sampler, logits, key, step, seen, penalties, ~done)


# ------------------------------------------------------------------------------ the loop
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _LoopState:
    """The ``lax.while_loop`` carry of :func:`generate`."""

    step: Int[Array, ""]  # tokens written so far; the next token's index
    token: StepTokens  # last sampled token (fed to decode, in vocabulary even for finished rows)
    tokens: Int[Array, "batch new"]  # the output buffer
    done: Bool[Array, " batch"]  # the row has emitted its EOS
    lengths: Lengths  # tokens generated per row, EOS included
    cache: Any  # the model's cache
    seen: _Seen | None = None  # what the penalties read; None (no carry) without penalties


def _emit(done, token, eos_token_id, pad_token_id):
    """What a step writes (pad for finished rows) and the done flags after it."""
    written = jnp.where(done, jnp.int32(pad_token_id), token)
    if eos_token_id is not None:
        done = done | (token == eos_token_id)
    return written, done


def _check_decode(model, params, token, logits, cache) -> None:
    """Raise a plain-words error (at trace time) unless decode keeps the logits and cache types fixed."""
    out_logits, out_cache = jax.eval_shape(model.decode, params, token, cache)
    if out_logits.shape != jnp.shape(logits):
        raise ValueError(
            f"model.decode returned logits of shape {out_logits.shape}, but model.prefill returned "
            f"{jnp.shape(logits)}; both must be (batch, vocab)"
        )
    given, returned = jax.tree_util.tree_structure(cache), jax.tree_util.tree_structure(out_cache)
    if given != returned:
        raise ValueError(
            f"model.decode must return a cache with the same structure as the one it is given (it is a "
            f"loop carry); got {returned}, expected {given}"
        )
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(cache), jax.tree_util.tree_leaves(out_cache),
                            strict=True):
        if (jnp.shape(a), jnp.result_type(a)) != (b.shape, b.dtype):
            raise ValueError(
                f"model.decode changed the cache entry {jax.tree_util.keystr(path) or '(root)'} from "
                f"{jnp.result_type(a)}{list(jnp.shape(a))} to {b.dtype}{list(b.shape)}; the cache must keep "
                f"its shapes and dtypes (it is a loop carry)"
            )


def _generation_loop(
    model, params, prompt, lengths, key, *, max_new_tokens, sampler, eos_token_id, pad_token_id, penalties=None
) -> _LoopState:
    """The traced body of :func:`generate` (un-jitted): prefill, token 0, then the decode loop. ``penalties``
    that are not active are no penalties (the very same program)."""
    batch = prompt.shape[0]
    penalties = _active(penalties)
    params = prepare_params(model, params)  # once, before the loop (e.g. per-layer weights for decode)
    token, logits, cache, seen = _first_token(model, params, prompt, lengths, key, sampler, penalties)
    _check_decode(model, params, token, logits, cache)
    written, done = _emit(jnp.zeros((batch,), bool), token, eos_token_id, pad_token_id)
    buffer = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32)
    buffer = lax.dynamic_update_slice_in_dim(buffer, written[:, None], 0, axis=1)
    init = _LoopState(
        step=jnp.int32(1), token=token, tokens=buffer, done=done, lengths=jnp.ones((batch,), jnp.int32),
        cache=cache, seen=seen,
    )

    def cond(s: _LoopState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        logits, cache = model.decode(params, s.token, s.cache)
        token, seen = _next_token(sampler, logits, key, s.step, s.seen, penalties, s.done)
        written, done = _emit(s.done, token, eos_token_id, pad_token_id)
        return _LoopState(
            step=s.step + 1,
            token=token,
            tokens=lax.dynamic_update_slice_in_dim(s.tokens, written[:, None], s.step, axis=1),
            done=done,
            lengths=s.lengths + (~s.done).astype(jnp.int32),
            cache=cache,
            seen=seen,
        )

    return lax.while_loop(cond, body, init)


@functools.partial(
    inference_jit,
    static_argnames=("model", "max_new_tokens", "sampler", "eos_token_id", "pad_token_id", "penalties"),
)
def _generate(model, params, prompt, lengths, key, *, max_new_tokens, sampler, eos_token_id, pad_token_id,
              penalties=None):
    final = _generation_loop(
        model, params, prompt, lengths, key, max_new_tokens=max_new_tokens, sampler=sampler,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, penalties=penalties,
    )
    return GenerationResult(tokens=final.tokens, lengths=final.lengths)


# ------------------------------------------------------------------------------ validation
def _check_hashable(name: str, obj) -> None:
    try:
        hash(obj)
    except TypeError:
        raise TypeError(
            f"{name} must be hashable (a frozen dataclass holding no arrays): it is a static jit argument; "
            f"got an unhashable {type(obj).__name__}"
        ) from None


def _token_id(name: str, value, *, optional: bool) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not _INT32.min <= value <= _INT32.max:
        kind = "a Python int or None" if optional else "a Python int"
        raise TypeError(f"{name} must be {kind} (it is a static jit argument), got {value!r}")
    return int(value)


def _validate(model, prompt, max_new_tokens, sampler, key, prompt_lengths, eos_token_id, pad_token_id):
    """Check a generation request; return the normalised (max_new_tokens, eos_token_id, pad_token_id)."""
    if not (callable(getattr(model, "prefill", None)) and callable(getattr(model, "decode", None))):
        raise TypeError(
            f"model must have prefill(params, tokens[, lengths]) and decode(params, token, cache) methods, "
            f"got {type(model).__name__}"
        )
    _check_hashable("model", model)
    check_integer("prompt", prompt)
    if np.ndim(prompt) != 2 or 0 in np.shape(prompt):
        raise ValueError(f"prompt must have shape (batch, seq) with batch, seq >= 1, got {np.shape(prompt)}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not callable(sampler):
        raise TypeError(f"sampler must be a callable such as Greedy() or Sample(...), got {sampler!r}")
    _check_hashable("sampler", sampler)
    if key is None and not isinstance(sampler, Greedy):
        raise ValueError(f"{sampler!r} needs a PRNG key: pass key=jax.random.key(seed)")
    if prompt_lengths is not None:
        check_lengths("prompt_lengths", prompt_lengths, *np.shape(prompt))
    eos = _token_id("eos_token_id", eos_token_id, optional=True)
    pad = _token_id("pad_token_id", pad_token_id, optional=False)
    return int(max_new_tokens), eos, pad


def _active(penalties: Penalties | None) -> Penalties | None:
    """``penalties`` if they change any logit, else None (one program, one jit cache entry, for both)."""
    return penalties if penalties is not None and penalties.active else None


def _checked_penalties(penalties) -> Penalties | None:
    """``penalties`` checked to be a :class:`Penalties` or None; the active ones, else None."""
    if penalties is not None and not isinstance(penalties, Penalties):
        raise TypeError(
            f"penalties must be ssdkit.Penalties(repetition=, presence=, frequency=) or None, got {penalties!r}"
        )
    return _active(penalties)


def _as_inputs(prompt, prompt_lengths):
    lengths = None if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    return jnp.asarray(prompt, jnp.int32), lengths


# ------------------------------------------------------------------------------ public entry points
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
    speculative: Speculative | None = None,
    draft_params: Any = None,
    penalties: Penalties | None = None,
) -> GenerationResult:
    """Prefill ``prompt`` and generate up to ``max_new_tokens`` tokens per row in one compiled device call.

    Args:
        model: a hashable :class:`LanguageModel` (static: one compilation per model object value).
        params: the model's parameters (any PyTree of arrays).
        prompt: (batch, seq) integer token ids; right-padded when ``prompt_lengths`` is given.
        max_new_tokens: buffer size, the most tokens generated per row (static).
        sampler: :class:`Greedy` (default) or :class:`Sample`, see :func:`make_sampler` (static).
        key: PRNG key; token ``i`` is drawn with ``fold_in(key, i)``. Only :class:`Greedy` may omit it.
        eos_token_id: a row is done after emitting it (it counts in the row's length). None: never.
        prompt_lengths: (batch,) integer lengths in 1..seq of the right-padded prompt rows.
        pad_token_id: written after a row's EOS.
        speculative: a :class:`~ssdkit.Speculative` to decode speculatively (static; the model then needs
            ``verify`` and ``commit``, see ``ssdkit.inference.speculative``): the same tokens as plain greedy
            decoding, or the same distribution as plain sampling, in fewer passes of the weights.
        draft_params: the parameters of a :class:`~ssdkit.DraftModel` (only with one).
        penalties: :class:`~ssdkit.Penalties` (static) on the tokens a row has seen: each token (token 0
            included) is drawn from ``penalize(logits, counts, prompt_mask, ...)``
            (``ssdkit.inference.sampling.penalize``) instead of the logits,
            ``l'_v = ρ(l_v) − frequency · c_v − presence · [c_v > 0]``, where ``c_v`` counts the row's
            generated tokens equal to ``v`` so far and ``ρ(l) = l / r if l > 0 else l · r`` (r the
            repetition penalty) for ``v`` in the row's prompt (its first ``prompt_lengths`` tokens) or
            generated, ``ρ(l) = l`` otherwise. None or ``Penalties()``: none (the plain program). Not with
            ``speculative`` (ValueError): a verify pass scores k tokens at once, and penalties would make
            each one's logits depend on the tokens it verifies.

    Returns:
        :class:`GenerationResult` with ``tokens`` (batch, max_new_tokens) int32, ``lengths`` (batch,) and,
        when speculative, ``speculation`` (:class:`SpeculationStats`).
    """
    program, args, static = _program(
        model, params, prompt, max_new_tokens=max_new_tokens, sampler=sampler, key=key, eos_token_id=eos_token_id,
        prompt_lengths=prompt_lengths, pad_token_id=pad_token_id, speculative=speculative, draft_params=draft_params,
        penalties=penalties,
    )
    return program(*args, **static)


def _program(model, params, prompt, *, max_new_tokens, sampler, key, eos_token_id, prompt_lengths, pad_token_id,
             speculative, draft_params, penalties):
    """Check a :func:`generate` request; return the jitted program that runs it, its positional arguments (the
    model first: static) and its static keyword arguments."""
    max_new_tokens, eos, pad = _validate(
        model, prompt, max_new_tokens, sampler, key, prompt_lengths, eos_token_id, pad_token_id
    )
    penalties = _checked_penalties(penalties)
    prompt, lengths = _as_inputs(prompt, prompt_lengths)
    static = dict(max_new_tokens=max_new_tokens, sampler=sampler, eos_token_id=eos, pad_token_id=pad)
    if speculative is not None:
        if penalties is not None:
            raise ValueError(
                f"penalties={penalties!r} cannot be combined with speculative decoding: a verify pass scores k "
                f"tokens at once, and penalties would make each one's logits depend on the tokens it verifies; "
                f"pass penalties=None, or speculative=None"
            )
        check_speculative(model, sampler, speculative, draft_params)
        args = (model, params, draft_params, prompt, lengths, key)
        return generate_speculative, args, dict(static, speculative=speculative)
    if draft_params is not None:
        raise ValueError("draft_params is for speculative decoding with a DraftModel; pass speculative= too")
    return _generate, (model, params, prompt, lengths, key), dict(static, penalties=penalties)


@dataclasses.dataclass(frozen=True)
class CompiledGeneration:
    """A generation request's program, compiled (:meth:`LoweredGeneration.compile`). Calling it runs the
    program once on the request's arguments and returns its :class:`GenerationResult` (dispatched
    asynchronously, as :func:`generate`'s). ``compiled`` is the ``jax.stages.Compiled`` (``as_text()``,
    ``memory_analysis()``, ``cost_analysis()``)."""

    compiled: jax.stages.Compiled
    args: tuple  # the program's dynamic arguments

    def __call__(self) -> GenerationResult:
        return self.compiled(*self.args)


@dataclasses.dataclass(frozen=True)
class LoweredGeneration:
    """A generation request's program, traced and lowered (:func:`lower_generate`); ``lowered`` is the
    ``jax.stages.Lowered`` (``as_text()``, ``cost_analysis()``)."""

    lowered: jax.stages.Lowered
    args: tuple  # the program's dynamic arguments

    def compile(self) -> CompiledGeneration:
        """Compile the program with XLA (the persistent compilation cache applies, if turned on)."""
        return CompiledGeneration(self.lowered.compile(), self.args)


def lower_generate(
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
    speculative: Speculative | None = None,
    draft_params: Any = None,
    penalties: Penalties | None = None,
) -> LoweredGeneration:
    """The program :func:`generate` runs for this request (same arguments, same checks), traced and lowered
    now, to compile and run as separate steps::

        lowered = ssdkit.lower_generate(model, params, prompt, max_new_tokens=64)   # trace + lower
        compiled = lowered.compile()                                                  # XLA compiles
        result = compiled()            # runs it once: the GenerationResult generate(...) would return

    so a caller can time compilation and generation apart without running the generation twice. Tracing
    happens here (for speculative decoding with estimated ``round_costs``, that includes lowering the
    round programs for their cost analysis). Under a mesh, call ``lower_generate`` (and the compiled
    program) inside ``with jax.set_mesh(mesh):`` as you would :func:`generate`. The compiled program is
    the one :func:`generate` compiles and caches: with equal arguments, a later :func:`generate` call reuses
    it (JAX's in-memory caches; also the persistent compilation cache when turned on).
    """
    program, args, static = _program(
        model, params, prompt, max_new_tokens=max_new_tokens, sampler=sampler, key=key, eos_token_id=eos_token_id,
        prompt_lengths=prompt_lengths, pad_token_id=pad_token_id, speculative=speculative, draft_params=draft_params,
        penalties=penalties,
    )
    return LoweredGeneration(program.lower(*args, **static), args[1:])


@functools.partial(
    inference_jit, static_argnames=("model", "sampler", "eos_token_id", "pad_token_id", "penalties")
)
def _stream_first(model, params, prompt, lengths, key, *, sampler, eos_token_id, pad_token_id, penalties=None):
    token, _, cache, seen = _first_token(model, params, prompt, lengths, key, sampler, penalties)
    written, done = _emit(jnp.zeros(token.shape, bool), token, eos_token_id, pad_token_id)
    return token, written, done, cache, seen


@functools.partial(
    inference_jit, static_argnames=("model", "sampler", "eos_token_id", "pad_token_id", "penalties"),
    donate_argnames=("cache", "seen"),
)
def _stream_next(model, params, token, done, cache, key, step, seen, *, sampler, eos_token_id, pad_token_id,
                 penalties=None):
    logits, cache = model.decode(params, token, cache)
    token, seen = _next_token(sampler, logits, key, step, seen, penalties, done)
    written, done = _emit(done, token, eos_token_id, pad_token_id)
    return token, written, done, cache, seen


_prepare = inference_jit(prepare_params, static_argnames=("model",))


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
    penalties: Penalties | None = None,
) -> Iterator[StepTokens]:
    """Yield each step's (batch,) int32 tokens as they are produced, for interactive use.

    Same arguments (``penalties`` included), key schedule and tokens as :func:`generate` (finished rows
    yield ``pad_token_id``),
    but one device call per token: a jitted prefill + sample, then a jitted decode + sample step that
    donates the cache. Step ``i + 1`` is dispatched before step ``i`` is yielded, so the device works
    while the caller handles a token. Stops after ``max_new_tokens`` steps or once every row is done.
    Arguments are checked when this is called, not at the first ``next``.
    """
    max_new_tokens, eos, pad = _validate(
        model, prompt, max_new_tokens, sampler, key, prompt_lengths, eos_token_id, pad_token_id
    )
    penalties = _checked_penalties(penalties)
    prompt, lengths = _as_inputs(prompt, prompt_lengths)
    params = _prepare(model, params)  # the decode layout, kept for this stream only
    static = dict(sampler=sampler, eos_token_id=eos, pad_token_id=pad, penalties=penalties)
    first = functools.partial(_stream_first, model, **static)
    advance = functools.partial(_stream_next, model, **static)

    def steps() -> Iterator[StepTokens]:
        token, written, done, cache, seen = first(params, prompt, lengths, key)
        for step in range(1, max_new_tokens + 1):
            if step < max_new_tokens:  # dispatched now, runs while the caller handles `written`
                following = advance(params, token, done, cache, key, np.int32(step), seen)
            yield written
            if eos is not None and bool(np.all(np.asarray(done))):
                return
            if step < max_new_tokens:
                token, written, done, cache, seen = following

    return steps()

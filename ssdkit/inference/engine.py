"""A serving engine: continuous batching over a fixed pool of state slots, with an exact prefix cache.

The engine is generic over the language-model protocol (``ssdkit.inference.protocol``), with one more
requirement: ``prefill(params, tokens, lengths=, cache=)`` continues from a cache (a fresh cache is all
zeros, as every ssdkit model's is). Its device state is one :class:`SlotState`: the model's cache for
``slots`` rows, each row's last token, its sampling settings as data (:class:`ssdkit.inference.sampling.RowSampling`)
and its token counts for the penalties. Three compiled programs do all the work:

* a prefill *piece* (batch 1, a power-of-two length, so a handful of programs serve every prompt): a prompt
  is prefilled from the longest cached prefix (:class:`~ssdkit.inference.prefix_cache.PrefixCache`) in
  pieces of the longest length that fits before the next snapshot (only a tail shorter than the shortest
  length is padded, with lengths masking the padding);
* *admit*: sample a request's first token from its prompt's last logits and write its cache, token and
  settings into a free slot;
* *step*: one decode step of every slot at once, sampling each row with its own settings and key.

One engine iteration (:meth:`Engine.step`) runs at most one prefill piece and then one decode step of the
live slots, so a long prompt never stalls the streams already running by more than a piece. A finished
(EOS, ``max_new_tokens``) or cancelled request frees its slot at once and the next queued one takes it.
Row b's token i is drawn with ``fold_in(key(seed), i)``, as ``ssdkit.generate`` draws a batch-1 request's,
so a request's tokens do not depend on what else runs beside it (up to floating-point rounding of the
batched programs).

:meth:`Engine.start` runs the iterations in a thread of their own; ``submit`` and ``cancel`` may be called
from any thread, and each request's :class:`TokenEvent` s go to the callback it was submitted with (called
in the engine's thread: hand them on, do not compute there).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Int

from ssdkit._typing import Lengths, StepTokens
from ssdkit.inference.prefix_cache import PrefixCache
from ssdkit.inference.protocol import prepare_params
from ssdkit.inference.sampling import (
    Greedy,
    Penalties,
    RowSampling,
    Sample,
    TokenLogprobs,
    sample_rows,
    top_logprobs,
)
from ssdkit.xla_options import inference_jit

log = logging.getLogger("ssdkit.engine")

FINISH_STOP = "stop"  # the model's end-of-text token (or, in the server, a stop string)
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


# ------------------------------------------------------------------------------ configuration and requests
@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an :class:`Engine` holds and accepts.

    Attributes:
        slots: requests decoded together (the batch of the compiled decode step).
        max_queue: requests waiting for a slot; past it, :meth:`Engine.submit` raises :class:`QueueFull`.
        max_prompt_tokens: longest prompt accepted.
        max_new_tokens: most tokens one request may ask for.
        snapshot_interval: tokens between prefix-cache snapshots inside a prompt, and the longest prefill
            piece (so also how long one piece keeps the running streams waiting).
        prefix_cache_bytes: bytes of snapshots kept (0 turns the prefix cache off).
        max_logprobs: most alternatives a request may ask for per token.
        min_bucket: the shortest prefill piece shape (pieces are padded up to a power of two from here).
    """

    slots: int = 8
    max_queue: int = 64
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 4096
    snapshot_interval: int = 256
    prefix_cache_bytes: int = 512 * 2**20
    max_logprobs: int = 5
    min_bucket: int = 16

    def __post_init__(self):
        for name in ("slots", "max_queue", "max_prompt_tokens", "max_new_tokens", "snapshot_interval",
                     "min_bucket"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {v!r}")
        for name in ("prefix_cache_bytes", "max_logprobs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 0, got {v!r}")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The decode batches compiled: powers of two below ``slots``, and ``slots``. The live requests are the
        first rows of the smallest that holds them, so a step costs what they need, not what ``slots`` would."""
        out = [1]
        while out[-1] * 2 < self.slots:
            out.append(out[-1] * 2)
        return tuple(sorted({*out, self.slots}))

    @property
    def buckets(self) -> tuple[int, ...]:
        """The prefill piece lengths compiled: powers of two from ``min_bucket`` up to ``snapshot_interval``
        (a piece never crosses a snapshot boundary)."""
        out = [1 << max(0, math.ceil(math.log2(self.min_bucket)))]
        while out[-1] * 2 <= self.snapshot_interval:
            out.append(out[-1] * 2)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One request: its prompt ids and how to sample.

    Attributes:
        prompt: the prompt's token ids (at least one).
        max_new_tokens: most tokens generated (the EOS included when it comes).
        sampler: :class:`~ssdkit.Greedy` or :class:`~ssdkit.Sample`.
        penalties: :class:`~ssdkit.inference.sampling.Penalties`.
        seed: token i is drawn with ``fold_in(jax.random.key(seed), i)``.
        logprobs: None, or how many most likely alternatives (0..max_logprobs) to report per token with the
            chosen token's log-probability.
        ignore_eos: keep generating past the end-of-text token (benchmarks).
    """

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampler: Greedy | Sample = Greedy()
    penalties: Penalties = Penalties()
    seed: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What a request's callback receives: one per generated token, then the last one with
    ``finish_reason`` set (``token`` None when the request ended without a new token: cancelled, error).

    Attributes:
        token: the generated id, or None.
        index: its position in the output (0 first).
        logprob: its log-probability under the model (when asked for).
        top: the most likely alternatives ((id, log-probability), most likely first), when asked for.
        finish_reason: None while running; then ``"stop"`` (the end-of-text token, which is ``token``),
            ``"length"``, ``"cancelled"`` or ``"error"``.
        message: what went wrong, for ``"error"``.
        cached_tokens: prompt tokens taken from the prefix cache (on the first event).
        time: ``time.perf_counter()`` when the engine produced it.
    """

    token: int | None
    index: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None
    finish_reason: str | None = None
    message: str | None = None
    cached_tokens: int = 0
    time: float = 0.0


class QueueFull(Exception):
    """The engine's queue is full: try again later."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new requests."""


class RequestHandle:
    """A submitted request: :meth:`cancel` it from any thread; its slot is freed within one engine step."""

    def __init__(self, request_id: int, request: GenerationRequest, on_event: Callable[[TokenEvent], None]):
        self.id = request_id
        self.request = request
        self.on_event = on_event
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.cancel_reason = FINISH_CANCELLED
        self.finished = False
        self.generated = 0

    def cancel(self, reason: str = FINISH_CANCELLED) -> None:
        """End the request at the engine's next iteration; its last event says ``reason`` (``"stop"`` when a
        caller ended it on a stop string of its own)."""
        if not self.cancelled:
            self.cancel_reason = reason
        self.cancelled = True


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started (read by a server's ``/metrics``)."""

    requests_submitted: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    prefill_pieces: int = 0
    prefill_seconds: float = 0.0
    slot_steps: int = 0  # sum over decode steps of the slots live in it


# ------------------------------------------------------------------------------ device state and programs
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Everything the decode step reads and writes, for every slot.

    Attributes:
        cache: the model's cache for ``slots`` rows.
        token: (slots,) the last token of each row (the next decode step's input).
        step: (slots,) the index of the next token each row samples.
        rows: each row's sampling settings and key.
        counts: (slots, vocab) times each row generated each token (the penalties').
        prompt_mask: (slots, vocab) the tokens of each row's prompt (the repetition penalty's).
        logprobs: (slots,) whether the row reports log-probabilities.
    """

    cache: Any
    token: StepTokens
    step: Lengths
    rows: RowSampling
    counts: Int[Array, "slots vocab"]
    prompt_mask: Bool[Array, "slots vocab"]
    logprobs: Bool[Array, " slots"]


def _vocabulary(logits, vocab: int):
    """The logits of the vocabulary's ids only: a padded vocabulary's extra ids (rows of a padded embedding
    or head, no token of the tokenizer) get -inf, so they are never drawn and carry no probability."""
    if vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)


def _logprobs(logits, token, want, n: int) -> TokenLogprobs:
    """:func:`top_logprobs` when some row asks (``want``), zeros otherwise."""
    n = max(n, 1)
    batch = token.shape[0]
    zeros = TokenLogprobs(jnp.zeros((batch,), jnp.float32), jnp.zeros((batch, n), jnp.int32),
                          jnp.zeros((batch, n), jnp.float32))
    return lax.cond(jnp.any(want), lambda: top_logprobs(logits, token, n), lambda: zeros)


@functools.partial(inference_jit, static_argnames=("model",))
def _piece(model, params, tokens, lengths, cache):
    """Prefill one piece (1, bucket) of a prompt, continuing from ``cache``."""
    return model.prefill(params, tokens, lengths=lengths, cache=cache)


def _put_row(big, small, slot, axis):
    return lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), slot, axis=axis)


@functools.partial(inference_jit, static_argnames=("axes", "n_logprobs", "vocab"), donate_argnames=("state",))
def _admit(state: SlotState, slot, logits, cache, rows: RowSampling, prompt_mask, want_logprobs, *, axes,
           n_logprobs, vocab):
    """Sample a request's first token from its prompt's last ``logits`` (1, width) and write the request into
    row ``slot`` of ``state``."""
    logits = _vocabulary(logits, vocab)
    width = logits.shape[-1]
    zeros = jnp.zeros((1, width), jnp.int32)
    token = sample_rows(logits, rows, jnp.zeros((1,), jnp.int32), zeros, prompt_mask)
    lp = _logprobs(logits, token, want_logprobs, n_logprobs)
    put = functools.partial(_put_row, slot=slot)
    new = SlotState(
        cache=jax.tree_util.tree_map(lambda b, s, a: put(b, s, axis=a), state.cache, cache, axes),
        token=put(state.token, token, axis=0),
        step=put(state.step, jnp.ones((1,), jnp.int32), axis=0),
        rows=jax.tree_util.tree_map(lambda b, s: put(b, s, axis=0), state.rows, rows),
        counts=put(state.counts, jax.nn.one_hot(token, width, dtype=jnp.int32), axis=0),
        prompt_mask=put(state.prompt_mask, prompt_mask, axis=0),
        logprobs=put(state.logprobs, want_logprobs, axis=0),
    )
    return new, token, lp


@functools.partial(inference_jit, static_argnames=("model", "n_logprobs", "vocab"), donate_argnames=("state",))
def _decode(model, params, state: SlotState, *, n_logprobs, vocab):
    """One decode step of every slot: the next token of each row, with its settings and key."""
    logits, cache = model.decode(params, state.token, state.cache)
    logits = _vocabulary(logits, vocab)
    token = sample_rows(logits, state.rows, state.step, state.counts, state.prompt_mask)
    lp = _logprobs(logits, token, state.logprobs, n_logprobs)
    counts = state.counts.at[jnp.arange(token.shape[0]), token].add(1)
    return dataclasses.replace(state, cache=cache, token=token, step=state.step + 1, counts=counts), token, lp


def _state_axes(state: SlotState, axes) -> SlotState:
    """The batch axis of every leaf of a :class:`SlotState` (the cache's from ``axes``, 0 for the rest)."""
    rest = jax.tree_util.tree_map(lambda _: 0, dataclasses.replace(state, cache=None))
    return dataclasses.replace(rest, cache=axes)


@functools.partial(inference_jit, static_argnames=("axes",), donate_argnames=("state",))
def _move(state: SlotState, src, dst, *, axes):
    """Row ``src`` of every leaf copied to row ``dst`` (the live rows stay the first ones when one leaves)."""
    def move(a, axis):
        return lax.dynamic_update_slice_in_dim(a, lax.dynamic_slice_in_dim(a, src, 1, axis), dst, axis)

    return jax.tree_util.tree_map(move, state, _state_axes(state, axes))


@functools.partial(inference_jit, static_argnames=("axes", "rows"))
def _resize(state: SlotState, *, axes, rows: int) -> SlotState:
    """The state with ``rows`` rows: the first ones kept, new ones zero (the decode batch grows or shrinks)."""
    def resize(a, axis):
        n = a.shape[axis]
        if rows <= n:
            return lax.slice_in_dim(a, 0, rows, axis=axis)
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):  # keys pad as their raw data
            data = resize(jax.random.key_data(a), axis)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, rows - n)
        return jnp.pad(a, pad)

    return jax.tree_util.tree_map(resize, state, _state_axes(state, axes))


def _batch_axes(model, params) -> Any:
    """The batch axis of each leaf of the model's cache (found by tracing prefill at batch 1 and 2)."""
    shapes = [jax.eval_shape(lambda p, t: model.prefill(p, t)[1], params, jax.ShapeDtypeStruct((b, 1), jnp.int32))
              for b in (1, 2)]

    def axis(a, b):
        diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        if len(diff) != 1:
            raise ValueError(f"cannot tell the batch axis of a cache entry of shape {a.shape} (batch 1) / "
                             f"{b.shape} (batch 2)")
        return diff[0]

    return jax.tree_util.tree_map(axis, *shapes)


# ------------------------------------------------------------------------------ the engine
@dataclasses.dataclass
class _Prefill:
    """A request being prefilled piece by piece (it takes a row of the decode batch when its prompt is done)."""

    handle: RequestHandle
    chain: Any
    position: int
    boundaries: list[int]
    cache: Any
    logits: Any
    cached_tokens: int




class Engine:
    """Continuous batching over ``config.slots`` state slots for ``model`` (a language model whose prefill
    continues from a cache), with a prefix cache of recurrent states. See the module docstring."""

    def __init__(self, model, params, config: EngineConfig = EngineConfig(), *, eos_token_id: int | None = None,
                 vocab_size: int | None = None, mesh: jax.sharding.Mesh | None = None):
        self.model = model
        self.config = config
        self.mesh = mesh
        with self._on_mesh():
            self.params = jax.jit(prepare_params, static_argnums=0)(model, params)
        self.eos_token_id = eos_token_id
        logits = jax.eval_shape(lambda p, t: model.prefill(p, t)[0], self.params,
                                jax.ShapeDtypeStruct((1, 1), jnp.int32))
        self.logits_width = int(logits.shape[-1])
        self.vocab_size = int(vocab_size) if vocab_size is not None else self.logits_width
        self._axes = _batch_axes(model, self.params)
        self._zero_row = self._zeros(1)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes, config.snapshot_interval)
        self.stats = EngineStats()
        # the decode batch: the live requests are its first rows, in self._live's order; it holds
        # self._rows rows, the smallest of self.batch_sizes that fits them (grown and shrunk as they come and go)
        self.batch_sizes = config.batch_sizes if mesh is None else (config.slots,)
        self._rows = self.batch_sizes[0]
        self._state = self._fresh_state(self._rows)
        self._queue: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._live: list[RequestHandle] = []
        self._prefill: _Prefill | None = None
        self._ids = itertools.count()
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._stop = False

    # ------------------------------------------------------------------ state
    def _on_mesh(self):
        """Where the programs run: under ``jax.set_mesh(mesh)`` with a mesh (params placed by the caller by
        the model's rules; the slots' cache is placed by the compiler), else as they are."""
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _zeros(self, batch: int):
        shapes = jax.eval_shape(lambda p, t: self.model.prefill(p, t)[1], self.params,
                                jax.ShapeDtypeStruct((batch, 1), jnp.int32))
        return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    def _fresh_state(self, s: int) -> SlotState:
        v = self.logits_width
        state = SlotState(
            cache=self._zeros(s), token=jnp.zeros((s,), jnp.int32), step=jnp.zeros((s,), jnp.int32),
            rows=RowSampling.of([(Greedy(), Penalties(), 0)] * s), counts=jnp.zeros((s, v), jnp.int32),
            prompt_mask=jnp.zeros((s, v), bool), logprobs=jnp.zeros((s,), bool),
        )
        return state if self.mesh is None else self._place(state)

    def _place(self, state: SlotState) -> SlotState:
        """On a mesh, the slots split over its ``data`` axis (data-parallel replicas, each decoding its share
        of the slots; when ``data`` divides them) and are replicated over the rest: the weights' own placement
        (fsdp, model) decides how each replica's work is split."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        n = dict(self.mesh.shape).get("data", 1)
        split = n > 1 and state.token.shape[0] % n == 0

        def put(leaf, axis):
            parts = [None] * jnp.ndim(leaf)
            if split:
                parts[axis] = "data"
            return jax.device_put(leaf, NamedSharding(self.mesh, P(*parts)))

        rest = dataclasses.replace(state, cache=None)
        rest = jax.tree_util.tree_map(lambda a: put(a, 0), rest)
        return dataclasses.replace(rest, cache=jax.tree_util.tree_map(put, state.cache, self._axes))

    # ------------------------------------------------------------------ requests
    def check(self, request: GenerationRequest) -> None:
        """Raise ValueError, saying why, unless the engine can run ``request``."""
        cfg = self.config
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"submit a GenerationRequest, got {type(request).__name__}")
        n = len(request.prompt)
        if n < 1:
            raise ValueError("the prompt must hold at least one token")
        if n > cfg.max_prompt_tokens:
            raise ValueError(f"the prompt has {n} tokens; this server takes at most {cfg.max_prompt_tokens}")
        ids = np.asarray(request.prompt)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError("prompt token ids must be integers")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"prompt token id {bad} is out of range 0..{self.vocab_size - 1}")
        m = request.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= cfg.max_new_tokens:
            raise ValueError(f"max_new_tokens must be an integer in 1..{cfg.max_new_tokens}, got {m!r}")
        if request.logprobs is not None and not 0 <= request.logprobs <= cfg.max_logprobs:
            raise ValueError(f"logprobs must be in 0..{cfg.max_logprobs}, got {request.logprobs!r}")
        if not -(2**63) <= request.seed < 2**63:
            raise ValueError(f"seed must be an integer in -2**63..2**63-1, got {request.seed}")

    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> RequestHandle:
        """Queue ``request``; its events go to ``on_event`` (called in the engine's thread).

        Raises ValueError (a request the engine cannot run), :class:`QueueFull` or :class:`EngineClosed`.
        """
        self.check(request)
        with self._lock:
            if not self._accepting:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.config.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFull(f"{len(self._queue)} requests are waiting for a slot (the most this server queues)")
            handle = RequestHandle(next(self._ids), request, on_event)
            self._queue.append(handle)
            self.stats.requests_submitted += 1
            self._lock.notify_all()
        return handle

    def cancel(self, handle: RequestHandle, reason: str = FINISH_CANCELLED) -> None:
        """:meth:`RequestHandle.cancel`, and wake the engine's thread."""
        handle.cancel(reason)
        with self._lock:
            self._lock.notify_all()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._live) + (self._prefill is not None)

    @property
    def slots_used(self) -> int:
        """Slots holding a request being decoded."""
        return len(self._live)

    @property
    def decode_batch(self) -> int:
        """Rows the decode step computes now: the smallest of :attr:`batch_sizes` that holds the live requests."""
        return self._rows

    @property
    def idle(self) -> bool:
        return not self._queue and not self._live and self._prefill is None

    # ------------------------------------------------------------------ one iteration
    def step(self) -> bool:
        """One engine iteration: drop cancelled requests, run one prefill piece (admitting a request into a
        slot when its prompt is done), then one decode step of the live slots. False if there was nothing to
        do."""
        with self._on_mesh():
            return self._step()

    def _step(self) -> bool:
        self._reap()
        worked = False
        if self._prefill is None and len(self._live) < self.config.slots:
            with self._lock:
                handle = self._queue.popleft() if self._queue else None
            if handle is not None:
                self._begin_prefill(handle)
                worked = True
        if self._prefill is not None:
            self._prefill_piece()
            worked = True
        if self._live:
            self._decode_step()
            worked = True
        return worked

    def _reap(self) -> None:
        with self._lock:
            gone = [h for h in self._queue if h.cancelled]
            for h in gone:
                self._queue.remove(h)
        for h in gone:
            self._finish(h, h.cancel_reason)
        if self._prefill is not None and self._prefill.handle.cancelled:
            self._finish(self._prefill.handle, self._prefill.handle.cancel_reason)
            self._prefill = None
        for handle in [h for h in self._live if h.cancelled]:
            self._release(handle)
            self._finish(handle, handle.cancel_reason)

    def _finish(self, handle: RequestHandle, reason: str, message: str | None = None) -> None:
        if handle.finished:
            return
        handle.finished = True
        if reason == FINISH_CANCELLED:
            self.stats.requests_cancelled += 1
        else:
            self.stats.requests_finished += 1
        handle.on_event(TokenEvent(token=None, index=handle.generated, finish_reason=reason, message=message,
                                   time=time.perf_counter()))

    def _release(self, handle: RequestHandle) -> None:
        """Free ``handle``'s row: the last live row moves into it, so the live rows stay the first ones; the
        decode batch shrinks when half of it is enough and nobody is waiting."""
        row, last = self._live.index(handle), len(self._live) - 1
        if row != last:
            self._state = _move(self._state, jnp.int32(last), jnp.int32(row), axes=self._axes)
            self._live[row] = self._live[last]
        self._live.pop()
        if not self._queue and self._prefill is None:
            self._resize(self._fit(len(self._live)))

    def _fit(self, n: int) -> int:
        return next(b for b in self.batch_sizes if b >= n)

    def _resize(self, rows: int) -> None:
        if rows != self._rows:
            self._state = _resize(self._state, axes=self._axes, rows=rows)
            if self.mesh is not None:
                self._state = self._place(self._state)
            self._rows = rows

    def _begin_prefill(self, handle: RequestHandle) -> None:
        ids = np.asarray(handle.request.prompt, np.int32)
        self.stats.prompt_tokens += len(ids)
        pc = self.prefix_cache
        chain = pc.chain(ids)
        snap = pc.lookup(chain) if pc.capacity_bytes else None
        start = 0 if snap is None else len(snap.ids)
        self._prefill = _Prefill(
            handle=handle, chain=chain, position=start,
            boundaries=pc.boundaries(ids, start),
            cache=self._zero_row if snap is None else snap.cache, logits=None if snap is None else snap.logits,
            cached_tokens=start,
        )

    def _prefill_piece(self) -> None:
        """Prefill the next piece of the prompt: the longest bucket that fits before the next snapshot boundary
        (so no piece is padded, except one shorter than the shortest bucket), snapshotting at the boundary."""
        p = self._prefill
        ids = p.chain.ids
        if p.boundaries:
            end = p.boundaries[0]
            left = end - p.position
            fitting = [b for b in self.config.buckets if b <= left]
            n = fitting[-1] if fitting else left
            bucket = fitting[-1] if fitting else self.config.buckets[0]
            tokens = np.zeros((1, bucket), np.int32)
            tokens[0, :n] = ids[p.position:p.position + n]
            t0 = time.perf_counter()
            try:
                p.logits, p.cache = _piece(self.model, self.params, jnp.asarray(tokens),
                                           jnp.asarray([n], jnp.int32), p.cache)
            except Exception as err:  # noqa: BLE001 - one request fails, the engine stays up
                log.exception("prefill failed")
                self._prefill = None
                self._finish(p.handle, FINISH_ERROR, f"prefill failed: {err}")
                return
            self.stats.prefill_pieces += 1
            self.stats.prefilled_tokens += n
            p.position += n
            if p.position == end:
                p.boundaries.pop(0)
                if self.prefix_cache.capacity_bytes:
                    self.prefix_cache.store(p.chain, end, p.cache, p.logits)
            self.stats.prefill_seconds += time.perf_counter() - t0
        if not p.boundaries:
            self._prefill = None
            self._admit(p)

    def _admit(self, p: _Prefill) -> None:
        req = p.handle.request
        mask = np.zeros((1, self.logits_width), bool)
        mask[0, np.asarray(req.prompt)] = True
        rows = RowSampling.of([(req.sampler, req.penalties, req.seed)])
        row = len(self._live)
        self._resize(max(self._rows, self._fit(row + 1)))
        self._state, token, lp = _admit(
            self._state, jnp.int32(row), p.logits, p.cache, rows, jnp.asarray(mask),
            jnp.asarray([req.logprobs is not None]), axes=self._axes, n_logprobs=self.config.max_logprobs,
            vocab=self.vocab_size,
        )
        self._live.append(p.handle)
        lp = jax.tree_util.tree_map(np.asarray, lp) if req.logprobs is not None else None
        self._emit(p.handle, 0, np.asarray(token), lp, cached=p.cached_tokens)

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        want = any(h.request.logprobs is not None for h in self._live)
        self._state, token, lp = _decode(self.model, self.params, self._state, n_logprobs=self.config.max_logprobs,
                                         vocab=self.vocab_size)
        token = np.asarray(token)
        lp = jax.tree_util.tree_map(np.asarray, lp) if want else None
        self.stats.decode_steps += 1
        self.stats.slot_steps += len(self._live)
        self.stats.decode_seconds += time.perf_counter() - t0
        for row, handle in reversed(list(enumerate(self._live))):  # from the last: a release moves only later rows
            self._emit(handle, row, token, lp)

    def _emit(self, h: RequestHandle, row: int, tokens: np.ndarray, lp: TokenLogprobs | None, cached: int = 0) -> None:
        req = h.request
        token = int(tokens[row])
        logprob = top = None
        if lp is not None and req.logprobs is not None:
            logprob = float(lp.logprob[row])
            ids, vals = lp.top_ids[row], lp.top_logprobs[row]
            top = tuple((int(i), float(v)) for i, v in zip(ids[:req.logprobs], vals[:req.logprobs], strict=True))
        h.generated += 1
        self.stats.generated_tokens += 1
        eos = self.eos_token_id is not None and not req.ignore_eos and token == self.eos_token_id
        reason = FINISH_STOP if eos else FINISH_LENGTH if h.generated >= req.max_new_tokens else None
        if reason is not None:
            self._release(h)
            h.finished = True
            self.stats.requests_finished += 1
        h.on_event(TokenEvent(token=token, index=h.generated - 1, logprob=logprob, top=top, finish_reason=reason,
                              cached_tokens=cached, time=time.perf_counter()))

    # ------------------------------------------------------------------ running
    def warmup(self) -> float:
        """Compile every program the engine runs (each prefill bucket, admit, decode) by running them on a
        throwaway request; returns the seconds it took. The prefix cache and statistics are left as they were."""
        with self._on_mesh():
            return self._warmup()

    def _warmup(self) -> float:
        t0 = time.perf_counter()
        for bucket in self.config.buckets:
            logits, cache = _piece(self.model, self.params, jnp.zeros((1, bucket), jnp.int32),
                                   jnp.ones((1,), jnp.int32), self._zero_row)
        rows = RowSampling.of([(Greedy(), Penalties(), 0)])
        state = None
        for size in self.batch_sizes:  # every decode batch, and the moves between neighbouring ones
            state = self._fresh_state(size) if state is None else _resize(state, axes=self._axes, rows=size)
            if self.mesh is not None:
                state = self._place(state)
            state, _, _ = _admit(state, jnp.int32(0), logits, cache, rows, jnp.zeros((1, self.logits_width), bool),
                                 jnp.zeros((1,), bool), axes=self._axes, n_logprobs=self.config.max_logprobs,
                                 vocab=self.vocab_size)
            state = _move(state, jnp.int32(0), jnp.int32(0), axes=self._axes)
            state, *_ = _decode(self.model, self.params, state, n_logprobs=self.config.max_logprobs,
                                vocab=self.vocab_size)
        for size in reversed(self.batch_sizes[:-1]):  # and back down
            state = _resize(state, axes=self._axes, rows=size)
        jax.block_until_ready(state)
        return time.perf_counter() - t0

    def run_until_idle(self) -> None:
        """Run iterations in this thread until nothing is queued or running (tests, batch jobs)."""
        while self.step():
            pass

    def start(self) -> None:
        """Run the iterations in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._thread = threading.Thread(target=self._loop, name="ssdkit-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except Exception as err:  # noqa: BLE001 - fail the live requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"engine step failed: {err}")
                worked = True
            if not worked:
                with self._lock:
                    if not self._stop and not self._queue and not any(h.cancelled for h in self._queue):
                        self._lock.wait(timeout=0.05)

    def _fail_all(self, message: str) -> None:
        live, self._live = self._live, []
        for handle in live:
            self._finish(handle, FINISH_ERROR, message)
        self._rows = self.batch_sizes[0]
        self._state = self._fresh_state(self._rows)

    def drain(self) -> None:
        """Take no new requests (:meth:`submit` raises :class:`EngineClosed`); queued and running ones go on."""
        with self._lock:
            self._accepting = False

    def cancel_all(self) -> None:
        with self._lock:
            handles = list(self._queue) + list(self._live)
            if self._prefill is not None:
                handles.append(self._prefill.handle)
            for h in handles:
                h.cancel()
            self._lock.notify_all()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the thread (after its current iteration); requests still running are cancelled."""
        self.cancel_all()
        if self._thread is not None:
            deadline = time.monotonic() + (timeout if timeout is not None else 60)
            while not self.idle and time.monotonic() < deadline and self._thread.is_alive():
                time.sleep(0.01)
            with self._lock:
                self._stop = True
                self._lock.notify_all()
            self._thread.join(timeout)
            self._thread = None

"""``ssdkit serve``: an OpenAI-compatible HTTP server over the serving engine (``ssdkit.inference.engine``).

An ASGI app on Starlette (routing, streaming responses), served by uvicorn; request bodies are checked by
pydantic models that forbid unknown fields and coerce nothing. The endpoints follow OpenAI's wire format,
so the official ``openai`` client (and anything else that speaks it) works unchanged:

* ``POST /v1/completions``: a prompt as text or token ids; ``max_tokens``, ``temperature``, ``top_p``,
  ``top_k``, ``min_p``, ``seed``, ``stop``, ``n`` = 1, ``logprobs`` (0..5), ``echo``, ``stream`` (server-sent
  events ending in ``data: [DONE]``; ``stream_options.include_usage``), ``presence_penalty``,
  ``frequency_penalty``, ``repetition_penalty``, ``ignore_eos``; ``usage`` counts;
* ``POST /v1/chat/completions``: when the model directory holds a chat template (``chat_template`` in
  ``tokenizer_config.json``, or ``chat_template.jinja``), rendered in a sandbox; a 400 otherwise;
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Errors are ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status: bad JSON, wrong types,
unknown fields, out-of-range values, a prompt or ``max_tokens`` past the limits (400); a missing or wrong
API key (401); an unknown model (404); a body past ``max_body_bytes`` (413); a full queue (429 with
``Retry-After``); a draining server (503). The engine runs in its own thread: the event loop only moves
bytes. A client that disconnects cancels its request, whose slot is freed within one engine step.

The engine (slots, queue, prefix cache) is generic; this module is the text and HTTP around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ssdkit.inference.engine import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_STOP,
    Engine,
    EngineClosed,
    GenerationRequest,
    QueueFull,
    TokenEvent,
)
from ssdkit.inference.sampling import Penalties, make_sampler
from ssdkit.inference.stops import StopStrings
from ssdkit.models import text
from ssdkit.models.generation_config import OPENAI, GenerationDefaults

log = logging.getLogger("ssdkit.server")

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_LENGTH = 256  # characters per stop string
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 20.0, 40.0, 80.0)


# ------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------ request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: no top-k cut (vLLM's convention)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False


class CompletionBody(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart]
    name: str | None = None


class ChatBody(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=5)


def _validation_error(err: ValidationError) -> ApiError:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"] if not (isinstance(p, str) and ("[" in p or p in {"str", "int"}))]
    param = ".".join(loc) or None
    more = f" (and {len(err.errors()) - 1} more problems)" if len(err.errors()) > 1 else ""
    return ApiError(400, f"{param or 'body'}: {first['msg']}{more}", param=param, code="invalid_value")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------ metrics
class _EngineCollector:
    """The engine's and prefix cache's counters, read at each scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e, s = self.engine, self.engine.stats
        pc = e.prefix_cache.stats

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            return c

        yield gauge("ssdkit_requests_running", "Requests being prefilled or decoded.", e.running)
        yield gauge("ssdkit_requests_queued", "Requests waiting for a slot.", e.queued)
        yield gauge("ssdkit_slots", "State slots (the batch of the decode step).", e.config.slots)
        yield gauge("ssdkit_slots_used", "Slots holding a request now.", e.slots_used)
        yield counter("ssdkit_prompt_tokens", "Prompt tokens of the requests started.", s.prompt_tokens)
        yield counter("ssdkit_prefill_tokens", "Prompt tokens prefilled (the rest came from the prefix cache).",
                      s.prefilled_tokens)
        yield counter("ssdkit_generation_tokens", "Tokens generated.", s.generated_tokens)
        yield counter("ssdkit_decode_steps", "Batched decode steps.", s.decode_steps)
        yield counter("ssdkit_decode_seconds", "Seconds in decode steps.", s.decode_seconds)
        yield counter("ssdkit_prefill_seconds", "Seconds in prefill pieces.", s.prefill_seconds)
        yield counter("ssdkit_slot_steps", "Sum over decode steps of the slots live in them (slot use).",
                      s.slot_steps)
        yield counter("ssdkit_requests_rejected", "Requests refused because the queue was full.",
                      s.requests_rejected)
        yield counter("ssdkit_prefix_cache_lookups", "Prompts looked up in the prefix cache.", pc.lookups)
        yield counter("ssdkit_prefix_cache_hits", "Prompts that resumed from a cached prefix.", pc.hits)
        yield counter("ssdkit_prefix_cache_misses", "Prompts with no cached prefix.", pc.lookups - pc.hits)
        yield counter("ssdkit_prefix_cache_hit_tokens", "Prompt tokens taken from the cache (prefill saved).",
                      pc.hit_tokens)
        yield counter("ssdkit_prefix_cache_evictions", "Snapshots evicted.", pc.evicted)
        yield gauge("ssdkit_prefix_cache_bytes", "Bytes of snapshots held.", e.prefix_cache.nbytes)
        yield gauge("ssdkit_prefix_cache_entries", "Snapshots held.", len(e.prefix_cache))
        hit_rate = pc.hit_tokens / pc.lookup_tokens if pc.lookup_tokens else 0.0
        yield gauge("ssdkit_prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the cache.",
                    hit_rate)


class _Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("ssdkit_time_to_first_token_seconds", "From the request's arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("ssdkit_inter_token_latency_seconds", "Between a request's consecutive tokens.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("ssdkit_request_latency_seconds", "From a request's arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("ssdkit_requests", "Requests answered, by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=self.registry)


# ------------------------------------------------------------------------------ the server
@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """The HTTP side's limits and identity."""

    model_name: str = "ssdkit"
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0
    #: the defaults of the sampling fields a request leaves out: the model's generation_config.json (``ssdkit
    #: serve`` reads it), else OpenAI's (temperature 1, no cuts, no penalties)
    sampling: GenerationDefaults = OPENAI


@dataclasses.dataclass
class _Output:
    """What one generation produced, accumulated for a non-streaming answer."""

    text: list[str] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[dict[str, float]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class _Submitted:
    """A request in the engine: its handle, the queue its events arrive on, when it arrived."""

    handle: Any
    queue: asyncio.Queue
    arrived: float


@dataclasses.dataclass
class _Delta:
    text: str
    token: int | None = None
    logprob: float | None = None
    top: dict[str, float] | None = None
    finish_reason: str | None = None
    cached_tokens: int = 0


class Server:
    """The app's state: the engine, the tokenizer, the chat template, limits and metrics. :meth:`app` is the
    ASGI app; :meth:`begin_drain` is what SIGTERM does."""

    def __init__(self, engine: Engine, tokenizer, config: ServerConfig = ServerConfig(), *,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}
        self.eos = text.eod_id(tokenizer) if tokenizer is not None else None
        self.metrics = _Metrics(engine)
        self.draining = False
        self.created = int(time.time())
        self._template = None

    # ------------------------------------------------------------------ app
    def app(self) -> Starlette:
        routes = [
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ]

        async def http_error(request, exc: HTTPException):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return ApiError(exc.status_code, str(exc.detail), kind=kind).response()

        async def server_error(request, exc: Exception):
            log.exception("unexpected error")
            return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})

    def begin_drain(self) -> None:
        """Answer new requests with 503 and let the engine finish what it has (SIGTERM)."""
        self.draining = True
        self.engine.drain()

    # ------------------------------------------------------------------ plumbing
    def _check_auth(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), self.config.api_key):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                           kind="authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> Any:
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"the request body has {length} bytes; this server takes at most {limit}",
                           code="body_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes",
                               code="body_too_large")
        try:
            return json.loads(bytes(data), parse_constant=_reject_constant)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the body is nested too deeply to be a request", code="invalid_json") from None

    def _guard(self, request: Request) -> None:
        self._check_auth(request)
        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="service_unavailable", code="draining")

    async def _body(self, request: Request, schema: type[BaseModel]) -> Any:
        self._guard(request)
        raw = await self._json(request)
        if not isinstance(raw, dict):
            raise ApiError(400, "the body must be a JSON object", code="invalid_json")
        try:
            body = schema.model_validate(raw)
        except ValidationError as err:
            raise _validation_error(err) from None
        if body.model is not None and body.model != self.config.model_name:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found",
                           kind="not_found_error")
        return body

    def _encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", param="prompt")
        return [int(i) for i in text.encode(self.tokenizer, prompt)]

    def _decode(self, ids) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def _token_text(self, token: int, as_id: bool) -> str:
        """A token as the logprobs name it: its text, or ``token_id:N`` (asked for, or a token that is not
        text on its own: a byte of a longer character; vLLM's convention)."""
        if as_id or self.tokenizer is None:
            return f"token_id:{token}"
        piece = self._decode([token])
        return f"token_id:{token}" if "\ufffd" in piece else piece

    def _request(self, body: _Sampling, ids: list[int], max_tokens: int, logprobs: int | None) -> GenerationRequest:
        """The engine's request for ``body``, every setting checked (ApiError naming the parameter)."""
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (one completion per request), got {body.n}", param="n")
        if body.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ApiError(400, f"each stop string must hold 1..{MAX_STOP_LENGTH} characters", param="stop")
        # a field left out takes the server's default: the model's generation_config.json (as vLLM), or OpenAI's
        d = self.config.sampling
        v = {f: d_v if (b_v := getattr(body, f)) is None else b_v for f, d_v in dataclasses.asdict(d).items()
             if f != "source"}
        top_k = v["top_k"] if v["top_k"] and v["top_k"] > 0 else None  # -1 or 0: no cut (vLLM's convention)
        sampler = make_sampler(v["temperature"], top_k, v["top_p"], v["min_p"] or None)
        penalties = Penalties(v["repetition_penalty"], v["presence_penalty"], v["frequency_penalty"])
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        req = GenerationRequest(prompt=tuple(ids), max_new_tokens=max_tokens, sampler=sampler, penalties=penalties,
                                seed=seed, logprobs=logprobs, ignore_eos=body.ignore_eos)
        try:
            self.engine.check(req)
        except ValueError as err:
            param = "max_tokens" if "max_new_tokens" in str(err) else "prompt"
            raise ApiError(400, str(err).replace("max_new_tokens", "max_tokens"), param=param) from None
        return req

    def _max_tokens(self, given: int | None, default: int) -> int:
        return default if given is None else given

    # ------------------------------------------------------------------ generation
    def _submit(self, req: GenerationRequest, endpoint: str) -> _Submitted:
        """Queue ``req`` in the engine, its events bound for this event loop; before any response starts, so
        that a full queue is a 429 and a draining server a 503 for streamed requests too."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        arrived = time.perf_counter()
        try:
            handle = self.engine.submit(req, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        except QueueFull as err:
            self.metrics.requests.labels(endpoint, "rejected").inc()
            raise ApiError(429, f"the server is busy: {err}; retry shortly", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", kind="service_unavailable", code="draining") from None
        return _Submitted(handle, queue, arrived)

    async def _generate(self, request: Request, sub: _Submitted, stops: list[str], endpoint: str,
                        watch_disconnect: bool, as_ids: bool = False) -> AsyncIterator[_Delta]:
        """Yield a submitted request's text pieces (stop strings cut, special tokens dropped)."""
        handle, queue, arrived = sub.handle, sub.queue, sub.arrived
        watcher = asyncio.create_task(self._watch(request, handle)) if watch_disconnect else None
        decoder = text.StreamDecoder(self.tokenizer) if self.tokenizer is not None else None
        stopper = StopStrings(stops)
        last = None
        outcome = "cancelled"
        try:
            while True:
                event = await queue.get()
                if event.token is not None:
                    now = event.time
                    if last is None:
                        self.metrics.ttft.observe(now - arrived)
                    else:
                        self.metrics.itl.observe(now - last)
                    last = now
                if event.token is not None and not (event.finish_reason == FINISH_STOP and event.token == self.eos):
                    piece = decoder.push(event.token) if decoder is not None else ""
                    shown, stopped = stopper.push(piece)
                    top = None if event.top is None else {self._token_text(i, as_ids): v for i, v in event.top}
                    if stopped:
                        self.engine.cancel(handle, FINISH_STOP)
                        outcome = "stop"
                        yield _Delta(shown, event.token, event.logprob, top, FINISH_STOP, event.cached_tokens)
                        return
                    yield _Delta(shown, event.token, event.logprob, top, None, event.cached_tokens)
                if event.finish_reason is not None:
                    if event.finish_reason == FINISH_ERROR:
                        outcome = "error"
                        raise ApiError(500, event.message or "generation failed", kind="server_error")
                    if event.finish_reason == FINISH_CANCELLED:
                        raise ApiError(503, "the request was cancelled (the server is shutting down)",
                                       kind="service_unavailable", code="cancelled")
                    outcome = event.finish_reason
                    yield _Delta(stopper.flush(), finish_reason=event.finish_reason)
                    return
        finally:
            if watcher is not None:
                watcher.cancel()
            self.engine.cancel(handle)  # a no-op when it finished; frees the slot when the client went away
            if last is not None:
                self.metrics.e2e.observe(last - arrived)
            self.metrics.requests.labels(endpoint, outcome).inc()

    async def _watch(self, request: Request, handle) -> None:
        """Cancel ``handle`` when the client disconnects (a non-streaming request: nothing is sent until the end)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.engine.cancel(handle)
                return

    def _sse(self, chunks: AsyncIterator[dict], sub: _Submitted) -> StreamingResponse:
        """Server-sent events of ``chunks``, then ``[DONE]``; the request is cancelled when the response ends
        (a no-op after it finished), also when the client left before the first chunk."""
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except ApiError as err:
                yield f"data: {json.dumps({'error': json.loads(err.response().body)['error']})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(self.engine.cancel, sub.handle))

    # ------------------------------------------------------------------ endpoints
    async def _completions(self, request: Request) -> Response:
        try:
            body: CompletionBody = await self._body(request, CompletionBody)
            ids = self._prompt_ids(body.prompt)
            if body.best_of not in (None, 1):
                raise ApiError(400, "best_of must be 1", param="best_of")
            if body.suffix is not None:
                raise ApiError(400, "suffix is not supported", param="suffix")
            if body.echo and body.logprobs is not None:
                raise ApiError(400, "echo with logprobs needs the prompt's log-probabilities, which this server "
                                    "does not compute", param="echo")
            req = self._request(body, ids, self._max_tokens(body.max_tokens, 16), body.logprobs)
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            sub = self._submit(req, "completions")
        except ApiError as err:
            return err.response()
        rid = f"cmpl-{secrets.token_hex(12)}"
        prefix = self._decode(ids) if body.echo else ""
        if body.stream:
            return self._sse(self._completion_chunks(request, rid, sub, stops, prefix, body), sub)
        try:
            out = await self._collect(self._generate(request, sub, stops, "completions", watch_disconnect=True,
                                                     as_ids=body.return_tokens_as_token_ids))
        except ApiError as err:
            return err.response()
        logprobs = None
        if body.logprobs is not None:
            pieces = [self._token_text(t, body.return_tokens_as_token_ids) for t in out.tokens]
            offsets = np.cumsum([0] + [len(p) for p in pieces[:-1]]).tolist() if pieces else []
            logprobs = {"tokens": pieces, "token_logprobs": out.logprobs, "top_logprobs": out.top,
                        "text_offset": [len(prefix) + o for o in offsets]}
        choice = {"index": 0, "text": prefix + "".join(out.text), "logprobs": logprobs,
                  "finish_reason": out.finish_reason}
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": self.config.model_name, "choices": [choice],
                             "usage": self._usage(len(ids), len(out.tokens), out.cached_tokens)})

    def _completion_chunks(self, request, rid, sub: _Submitted, stops, prefix, body) -> AsyncIterator[dict]:
        def choice(d: _Delta) -> dict:
            lp = None
            if body.logprobs is not None and d.token is not None:
                lp = {"tokens": [self._token_text(d.token, body.return_tokens_as_token_ids)],
                      "token_logprobs": [d.logprob], "top_logprobs": [d.top], "text_offset": [0]}
            return {"text": d.text, "logprobs": lp}

        opening = {"text": prefix, "logprobs": None} if prefix else None
        return self._stream_chunks(request, rid, sub, stops, body, "completions", "text_completion", opening, choice)

    async def _stream_chunks(self, request, rid, sub: _Submitted, stops, body, endpoint: str, kind: str,
                             opening: dict | None, choice) -> AsyncIterator[dict]:
        """A streamed answer's chunks (``object`` = ``kind``): ``opening`` first when given, then one per token
        (``choice(delta)``: its text and logprobs; the text may be held back) and the finish, then the usage when
        ``stream_options.include_usage`` asks."""
        created = int(time.time())
        n, cached = 0, 0

        def chunk(**fields) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": self.config.model_name, **fields}

        if opening is not None:
            yield chunk(choices=[{"index": 0, **opening, "finish_reason": None}])
        async with contextlib.aclosing(self._generate(request, sub, stops, endpoint, watch_disconnect=False,
                                                      as_ids=body.return_tokens_as_token_ids)) as deltas:
            async for d in deltas:
                n += d.token is not None
                cached = max(cached, d.cached_tokens)
                if d.text or d.finish_reason or d.token is not None:
                    yield chunk(choices=[{"index": 0, **choice(d), "finish_reason": d.finish_reason}])
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk(choices=[], usage=self._usage(len(sub.handle.request.prompt), n, cached))

    async def _collect(self, deltas: AsyncIterator[_Delta]) -> _Output:
        out = _Output()
        async with contextlib.aclosing(deltas):
            async for d in deltas:
                out.text.append(d.text)
                out.cached_tokens = max(out.cached_tokens, d.cached_tokens)
                if d.token is not None:
                    out.tokens.append(d.token)
                    out.logprobs.append(d.logprob)
                    out.top.append(d.top)
                if d.finish_reason is not None:
                    out.finish_reason = d.finish_reason
        return out

    def _usage(self, prompt: int, completion: int, cached: int) -> dict:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError(400, f"give one prompt per request (got {len(prompt)})", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self._encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    async def _chat(self, request: Request) -> Response:
        try:
            body: ChatBody = await self._body(request, ChatBody)
            if self.chat_template is None:
                raise ApiError(400, "this model has no chat template (chat_template in tokenizer_config.json, or "
                                    "chat_template.jinja, in its directory): use /v1/completions",
                               param="messages", code="no_chat_template")
            ids = self._encode(self._render(body.messages))
            max_tokens = body.max_completion_tokens or body.max_tokens
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            req = self._request(body, ids, self._max_tokens(max_tokens, self.engine.config.max_new_tokens), logprobs)
            stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            sub = self._submit(req, "chat")
        except ApiError as err:
            return err.response()
        rid = f"chatcmpl-{secrets.token_hex(12)}"
        if body.stream:
            return self._sse(self._chat_chunks(request, rid, sub, stops, body), sub)
        try:
            out = await self._collect(self._generate(request, sub, stops, "chat", watch_disconnect=True,
                                                     as_ids=body.return_tokens_as_token_ids))
        except ApiError as err:
            return err.response()
        logprobs = None
        if body.logprobs:
            logprobs = {"content": [self._chat_logprob(t, lp, top, body.return_tokens_as_token_ids)
                                    for t, lp, top in zip(out.tokens, out.logprobs, out.top, strict=True)]}
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(out.text)}, "logprobs": logprobs,
                  "finish_reason": out.finish_reason}
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": self.config.model_name, "choices": [choice],
                             "usage": self._usage(len(ids), len(out.tokens), out.cached_tokens)})

    def _chat_logprob(self, token, logprob, top, as_ids: bool) -> dict:
        piece = self._token_text(token, as_ids)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in (top or {}).items()]}

    def _chat_chunks(self, request, rid, sub: _Submitted, stops, body) -> AsyncIterator[dict]:
        def choice(d: _Delta) -> dict:
            lp = None
            if body.logprobs and d.token is not None:
                lp = {"content": [self._chat_logprob(d.token, d.logprob, d.top, body.return_tokens_as_token_ids)]}
            return {"delta": {"content": d.text} if d.text else {}, "logprobs": lp}

        opening = {"delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._stream_chunks(request, rid, sub, stops, body, "chat", "chat.completion.chunk", opening, choice)

    def _render(self, messages: list[Message]) -> str:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self._template is None:
            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        plain = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                  else "".join(p.text for p in m.content)} for m in messages]
        try:
            return self._template.render(messages=plain, add_generation_prompt=True, **self.special_tokens)
        except TemplateError as err:
            raise ApiError(400, f"the chat template refused the messages: {err}", param="messages") from None

    async def _models(self, request: Request) -> Response:
        try:
            self._check_auth(request)
        except ApiError as err:
            return err.response()
        e = self.engine
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "ssdkit",
            "max_model_len": e.config.max_prompt_tokens + e.config.max_new_tokens}]})

    async def _health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4; charset=utf-8")


# ------------------------------------------------------------------------------ chat templates
def chat_template(folder: Path | None) -> tuple[str | None, dict[str, str]]:
    """``(template or None, special tokens)`` from a model directory: ``chat_template.jinja``, or the
    ``chat_template`` of ``tokenizer_config.json`` (with its ``bos_token`` / ``eos_token``)."""
    if folder is None:
        return None, {}
    folder = Path(folder)
    specials: dict[str, str] = {}
    template = None
    config = folder / "tokenizer_config.json"
    if config.exists():
        data = json.loads(config.read_text(encoding="utf-8"))
        for name in ("bos_token", "eos_token"):
            value = data.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                specials[name] = value
        found = data.get("chat_template")
        if isinstance(found, str):
            template = found
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template, specials


# ------------------------------------------------------------------------------ running it
def make_uvicorn(server: Server, host: str, port: int, *, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``server.app()`` whose SIGTERM / SIGINT drains: the first signal makes new
    requests get 503 and lets running ones finish (cancelling them after ``drain_timeout``), then exits; a
    second signal exits at once. ``.run()`` serves (signals are caught in the main thread only; elsewhere call
    ``handle_exit`` to drain)."""
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if server.draining:
                return super().handle_exit(sig, frame)
            log.warning("draining: new requests get 503; waiting up to %.0f s for running ones",
                        server.config.drain_timeout)
            server.begin_drain()
            threading.Thread(target=self._drain_then_exit, daemon=True).start()

        def _drain_then_exit(self):
            deadline = time.monotonic() + server.config.drain_timeout
            while not server.engine.idle and time.monotonic() < deadline:
                time.sleep(0.02)
            server.engine.cancel_all()
            while not server.engine.idle and time.monotonic() < deadline + 5:
                time.sleep(0.02)
            self.should_exit = True

    config = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level, lifespan="off",
                            timeout_graceful_shutdown=5)
    return _Uvicorn(config)


def run(server: Server, host: str, port: int, *, log_level: str = "info") -> None:
    """Start the engine's thread and serve until SIGTERM / SIGINT (:func:`make_uvicorn`)."""
    uv = make_uvicorn(server, host, port, log_level=log_level)
    server.engine.start()
    try:
        uv.run()
    finally:
        server.engine.stop(timeout=5)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


"""``ssdkit serve``'s HTTP server, driven by the official ``openai`` client (and plain httpx for what a client
library would not send) against a server the test starts on a free loopback port, over a tiny Mamba-2 with
the byte tokenizer.

Token ids come back through ``logprobs`` (``return_tokens_as_token_ids``, vLLM's extension), with the top-2
log-probabilities that give each greedy decision's margin: the server's tokens are compared with the
engine's for the same request submitted to it directly (test_engine holds the engine to ``ssdkit.generate``)
up to near ties: the request may sit in another slot of the batched decode step.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from ssdkit.inference.engine import Engine, EngineConfig, GenerationRequest
from ssdkit.models import mamba2, server, text
from ssdkit.training.data import ByteTokenizer
from tests.helpers import assert_same_greedy_tokens

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=8, headdim=16, chunk_size=8)
ENGINE = EngineConfig(slots=2, max_queue=4, snapshot_interval=32, max_new_tokens=512, max_prompt_tokens=128)
KEY = "test-key"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
TIE = 1e-4
TOKENIZER = ByteTokenizer()


@dataclasses.dataclass
class Served:
    server: server.Server
    uvicorn: object
    thread: threading.Thread
    url: str

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.server.engine.stop(timeout=5)


def _model():
    params = jax.jit(mamba2.init_params, static_argnums=(0, 2))(CFG, jax.random.key(1), jnp.float32)
    return mamba2.Mamba2LM(CFG), params


def _start(config: EngineConfig = ENGINE, **server_kw) -> Served:
    model, params = _model()
    engine = Engine(model, params, config, vocab_size=CFG.vocab_size, eos_token_id=text.eod_id(TOKENIZER))
    srv = server.Server(engine, TOKENIZER, server.ServerConfig(model_name="tiny", api_key=KEY, max_body_bytes=4096,
                                                               **server_kw), chat_template=TEMPLATE)
    port = server.free_port()
    uv = server.make_uvicorn(srv, "127.0.0.1", port, log_level="error")
    engine.start()
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    return Served(srv, uv, thread, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def served():
    s = _start()
    yield s
    s.stop()


def _ids_and_margins(logprobs) -> tuple[list[int], np.ndarray]:
    ids = [int(t.removeprefix("token_id:")) for t in logprobs.tokens]
    margins = [sorted(top.values())[-1] - sorted(top.values())[-2] for top in logprobs.top_logprobs]
    return ids, np.array(margins)


def _direct(engine: Engine, prompt_ids, n) -> list[int]:
    """The engine's tokens for a greedy request submitted to it directly (test_engine holds the engine to
    ``ssdkit.generate``)."""
    done, events = threading.Event(), []

    def on_event(e):
        events.append(e)
        if e.finish_reason is not None:
            done.set()

    engine.submit(GenerationRequest(tuple(prompt_ids), n, ignore_eos=True), on_event)
    assert done.wait(30)
    return [e.token for e in events if e.token is not None]


def _shown(ids) -> str:
    decoder = text.StreamDecoder(TOKENIZER)
    return "".join(decoder.push(i) for i in ids if i != 256)


def test_completions_equal_generate_streamed_or_not(served):
    """Greedy completions of a text prompt, whole and streamed: the engine's tokens for the prompt (submitted
    to it directly), the text they decode to, the usage counts; then the prefix cache hits on the same
    prompt."""
    client = served.client()
    prompt = "def fibonacci(n):\n    "
    ids = [int(i) for i in text.encode(TOKENIZER, prompt)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, logprobs=2,
                                  extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
    got, margins = _ids_and_margins(r.choices[0].logprobs)
    alternatives = [int(t.removeprefix("token_id:")) for top in r.choices[0].logprobs.top_logprobs for t in top]
    assert max(got + alternatives) < CFG.vocab_size  # 257 of the 272 logits: the padding is never drawn
    want = _direct(served.server.engine, ids, 24)
    assert_same_greedy_tokens(np.array([got]), np.array([want[:len(got)]]), margins[None], tie=TIE)
    assert r.choices[0].text == _shown(got) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 24)
    assert r.model == "tiny" and r.object == "text_completion"

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True},
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens_details.cached_tokens == len(ids)

    echoed = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text.startswith(prompt)


def test_sampling_settings_stop_strings_and_chat(served):
    client = served.client()
    kw = dict(model="tiny", prompt="abc", max_tokens=40, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.2, "ignore_eos": True})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b  # the seed makes the draw reproducible
    full = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0]
    stop = full.text[10:13]
    cut = client.completions.create(model="tiny", prompt="abc", max_tokens=40, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          temperature=0, extra_body={"ignore_eos": True})
    rendered = "<user>hi\n<assistant>"
    assert chat.choices[0].message.content == client.completions.create(
        model="tiny", prompt=rendered, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    streamed = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    assert [m.id for m in client.models.list().data] == ["tiny"]


ERRORS = [  # (body, status, words in the message)
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "max_tokens": 513}, 400, "max_tokens must be an integer in 1..512"),
    ({"prompt": "x", "max_tokens": "3"}, 400, "max_tokens"),
    ({"prompt": [1, 2, 999]}, 400, "out of range 0..256"),
    ({"prompt": "x" * 200}, 400, "at most 128"),
    ({"prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ({"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ({"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, 400, "echo"),
    ({"prompt": "x", "model": "gpt-9"}, 404, "does not exist"),
    ({"prompt": []}, 400, "empty"),
]


def test_bad_requests_get_openai_errors(served):
    client = served.client()
    for body, status, words in ERRORS:
        extra = {k: v for k, v in body.items() if k != "prompt"}
        with pytest.raises(openai.APIStatusError) as info:
            client.completions.create(model=extra.pop("model", "tiny"), prompt=body["prompt"], extra_body=extra)
        assert info.value.status_code == status, body
        assert words in info.value.message and info.value.body["type"], (body, info.value.message)
    with pytest.raises(openai.AuthenticationError):
        served.client("wrong").completions.create(model="tiny", prompt="x")
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = [(b"{not json", 400, "not valid JSON"), (b'{"prompt": "x", "temperature": NaN}', 400, "NaN"),
           (b"[1, 2]", 400, "JSON object"), (json.dumps({"prompt": "x" * 5000}).encode(), 413, "at most 4096"),
           (b"[" * 2000 + b"]" * 2000, 400, "nested too deeply")]
    for body, status, words in raw:
        r = httpx.post(f"{served.url}/v1/completions", content=body, headers=headers)
        assert r.status_code == status and words in r.json()["error"]["message"], (body[:40], r.text)
    assert httpx.get(f"{served.url}/v1/nothing").status_code == 404
    assert httpx.get(f"{served.url}/v1/completions").status_code == 405
    no_template = server.Server(served.server.engine, TOKENIZER, server.ServerConfig(model_name="tiny"))
    r = TestClient(no_template.app()).post("/v1/chat/completions",
                                           json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}


def test_fields_left_out_take_the_models_sampling_defaults(served):
    """With the model's generation_config.json (``ServerConfig.sampling``, as ``ssdkit serve`` reads it), a
    request's missing fields take the model's settings and given ones win; without it, OpenAI's (temperature
    1, no cuts, no penalties)."""
    import ssdkit
    from ssdkit.models.generation_config import GenerationDefaults

    defaults = GenerationDefaults(temperature=0.7, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.2)
    with_defaults = server.Server(served.server.engine, TOKENIZER,
                                  server.ServerConfig(model_name="tiny", sampling=defaults))
    plain = server.Server(served.server.engine, TOKENIZER, server.ServerConfig(model_name="tiny"))

    def request(srv, **fields):
        return srv._request(server.CompletionBody(prompt="x", **fields), [1], 4, None)

    req = request(with_defaults)
    assert req.sampler == ssdkit.Sample(0.7, None, 0.9) and req.penalties == ssdkit.Penalties(1.1, 0.2)
    req = request(with_defaults, temperature=0.0, presence_penalty=0.0)
    assert req.sampler == ssdkit.Greedy() and req.penalties == ssdkit.Penalties(1.1, 0.0)
    req = request(plain)
    assert req.sampler == ssdkit.Sample(1.0) and not req.penalties.active


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10, 600), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20), st.lists(st.integers(-5, 300), max_size=5), st.lists(st.text(max_size=3),
                                                                                                max_size=5))
_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "logprobs", "echo",
           "stream", "presence_penalty", "frequency_penalty", "repetition_penalty", "ignore_eos", "model", "bogus"]


@settings(max_examples=30)
@given(body=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=7))
def test_any_body_gets_a_2xx_or_4xx_and_the_server_stays_up(served, body):
    body = {"max_tokens": 4, **body}
    r = httpx.post(f"{served.url}/v1/completions", content=json.dumps(body).encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60)
    assert 200 <= r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{served.url}/health").status_code == 200


def _wait(condition, seconds=10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_that_goes_away_frees_its_slot(served):
    engine = served.server.engine
    client = served.client()
    cancelled = engine.stats.requests_cancelled
    stream = client.completions.create(model="tiny", prompt="x", max_tokens=512, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    assert _wait(lambda: engine.stats.requests_cancelled == cancelled + 1 and engine.idle)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request whose client gives up
        httpx.post(f"{served.url}/v1/completions", json={"prompt": "y", "max_tokens": 512, "ignore_eos": True},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.05)
    assert _wait(lambda: engine.stats.requests_cancelled == cancelled + 2 and engine.idle)


def test_metrics_report_requests_latencies_and_the_prefix_cache(served):
    client = served.client()
    for _ in range(2):
        client.completions.create(model="tiny", prompt="metrics please", max_tokens=3)
    body = httpx.get(f"{served.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines()
              if line and not line.startswith("#")}
    assert values["ssdkit_prefix_cache_hits_total"] >= 1 and values["ssdkit_prefix_cache_hit_tokens_total"] >= 15
    assert values["ssdkit_time_to_first_token_seconds_count"] >= 2
    assert values["ssdkit_inter_token_latency_seconds_count"] >= 4
    assert values["ssdkit_generation_tokens_total"] >= 6 and values["ssdkit_slots"] == 2
    assert values['ssdkit_requests_total{endpoint="completions",outcome="length"}'] >= 2


def test_overload_gets_429_and_sigterm_drains():
    """A full queue answers 429 with Retry-After; SIGTERM lets the running request finish, answers new ones 503
    and stops the server."""
    s = _start(drain_timeout=30)
    try:
        engine = s.server.engine
        client = s.client()
        results = []
        first = threading.Thread(target=lambda: results.append(client.completions.create(
            model="tiny", prompt="a", max_tokens=300, temperature=0, extra_body={"ignore_eos": True})))
        first.start()
        assert _wait(lambda: engine.running == 1)
        handles = [engine.submit(GenerationRequest((1,), 300, ignore_eos=True), lambda e: None)]
        assert _wait(lambda: engine.running == 2)  # both slots taken
        handles += [engine.submit(GenerationRequest((1,), 300, ignore_eos=True), lambda e: None) for _ in range(4)]
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):  # a streamed request too: refused before its response starts
            client.completions.create(model="tiny", prompt="x", stream=True)
        for h in handles:
            engine.cancel(h)
        s.uvicorn.handle_exit(signal.SIGTERM, None)
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and httpx.get(f"{s.url}/health").status_code == 503
        first.join(30)
        assert results and results[0].usage.completion_tokens == 300 and results[0].choices[0].finish_reason == "length"
        s.thread.join(30)
        assert not s.thread.is_alive()
    finally:
        s.stop()

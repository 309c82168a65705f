"""The serving engine (continuous batching over state slots) and its prefix cache of recurrent states, on a
tiny Mamba-2.

Oracles: ``ssdkit.generate`` run on each request alone (batch 1, the same sampler and seed), and the engine
itself with its prefix cache turned off. The engine's programs (a padded prefill piece from a cache, a
batched decode step) differ from ``generate``'s, so their tokens are compared up to near ties
(``assert_same_greedy_tokens``: the margins come from the engine's own top-2 log-probabilities), and
log-probabilities within float32 rounding. A hit at a snapshot boundary reruns the very same programs on
the very same inputs as a miss, so those outputs are compared exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssdkit
from ssdkit.inference.engine import (
    Engine,
    EngineClosed,
    EngineConfig,
    GenerationRequest,
    QueueFull,
)
from ssdkit.inference.prefix_cache import PrefixCache
from ssdkit.inference.sampling import Penalties
from ssdkit.models import mamba2
from tests.helpers import assert_close, assert_same_greedy_tokens

#: a vocabulary with no padding (a multiple of 16), so the engine's logits are generate's (the engine gives a padded
#: vocabulary's extra ids no probability; test_serve checks that)
CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=272, d_state=8, headdim=16, chunk_size=8)
#: 2 slots (so requests queue, and a finishing request's row is taken by the last one), snapshots every 32 tokens
#: (pieces of 16 or 32)
CONFIG = EngineConfig(slots=2, max_queue=8, snapshot_interval=32, max_new_tokens=64, max_prompt_tokens=256)
TIE = 1e-4  # twice a generous bound on the logits' rounding between two programs (logits of order 1)


@functools.cache
def _model():
    params = jax.jit(mamba2.init_params, static_argnums=(0, 2))(CFG, jax.random.key(1), jnp.float32)
    return mamba2.Mamba2LM(CFG), params


def _engine(config: EngineConfig = CONFIG, **kw) -> Engine:
    model, params = _model()
    return Engine(model, params, config, vocab_size=CFG.vocab_size, **kw)


def _run(engine: Engine, requests: list[GenerationRequest]) -> list[list]:
    events = [[] for _ in requests]
    for i, r in enumerate(requests):
        engine.submit(r, events[i].append)
    engine.run_until_idle()
    return events


def _tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def _margins(events) -> np.ndarray:
    return np.array([e.top[0][1] - e.top[1][1] for e in events if e.token is not None])


def _prompt(rng, n: int) -> tuple[int, ...]:
    return tuple(int(i) for i in rng.integers(0, CFG.vocab_size, n))


def test_batched_requests_equal_generate_on_each_alone(rng):
    """More requests than slots, prompts shorter and longer than a piece, greedy and sampled rows side by side
    (each with its own seed): each request's tokens are ``generate``'s for it alone (batch 1, the same sampler
    and key; the prompts right-padded to one length with ``prompt_lengths``, so that two programs serve all)."""
    sampled = ssdkit.Sample(0.8, top_k=20, top_p=0.95, min_p=0.02)
    samplers = [ssdkit.Greedy(), sampled, ssdkit.Greedy(), sampled, sampled]
    lengths = [5, 70, 33, 1, 40]
    requests = [GenerationRequest(_prompt(rng, n), 12 + 3 * i, sampler=s, seed=10 + i, logprobs=2)
                for i, (n, s) in enumerate(zip(lengths, samplers, strict=True))]
    engine = _engine()
    events = _run(engine, requests)
    model, params = _model()
    width = max(lengths)
    for r, ev in zip(requests, events, strict=True):
        assert [e.index for e in ev if e.token is not None] == list(range(r.max_new_tokens))
        assert ev[-1].finish_reason == "length"
        prompt = np.zeros((1, width), np.int32)
        prompt[0, :len(r.prompt)] = r.prompt
        want = ssdkit.generate(model, params, jnp.asarray(prompt), max_new_tokens=24, sampler=r.sampler,
                               key=jax.random.key(r.seed), prompt_lengths=jnp.asarray([len(r.prompt)]))
        got = _tokens(ev)
        if isinstance(r.sampler, ssdkit.Greedy):
            assert_same_greedy_tokens(np.array([got]), np.asarray(want.tokens[:, :len(got)]), _margins(ev)[None],
                                      tie=TIE)
        else:  # a sampled draw flips only where the perturbed scores nearly tie: compare the first tokens
            assert got[:4] == [int(t) for t in want.tokens[0, :4]]
    assert engine.idle and engine.decode_batch == 1
    assert engine.stats.generated_tokens == sum(r.max_new_tokens for r in requests)


def test_prefix_cache_hits_and_exactness(rng):
    """An identical prompt hits its full length; a prompt sharing a long prefix hits at the last snapshot
    boundary in it, then at the branch point; a prompt shorter than the interval hits when seen whole. A
    full-length hit samples its first token from the very logits the first request computed (equal exactly);
    every output equals the engine's without a prefix cache (tokens up to near ties, log-probabilities to
    rounding: the decode step's row may sit in another slot, the pieces may be cut elsewhere)."""
    base = _prompt(rng, 75)
    branch_a = base[:50] + _prompt(rng, 10)
    branch_b = base[:50] + _prompt(rng, 7)
    short = _prompt(rng, 9)
    order = [base, base, branch_a, branch_b, short, short, base[:40]]
    engine = _engine()
    off = _engine(EngineConfig(**{**CONFIG.__dict__, "prefix_cache_bytes": 0}))
    got, cached = [], []
    for prompt in order:  # one at a time: each sees the snapshots of all before it
        (ev,) = _run(engine, [GenerationRequest(prompt, 8, logprobs=2)])
        got.append(ev)
        cached.append(ev[0].cached_tokens)
    assert cached == [0, 75, 32, 50, 0, 9, 32]
    for a, b in ((0, 1), (4, 5)):  # full-length hits: the first request's last logits, stored
        assert (got[a][0].token, got[a][0].logprob, got[a][0].top) == (got[b][0].token, got[b][0].logprob,
                                                                         got[b][0].top)
    for prompt, ev in zip(order, got, strict=True):
        (plain,) = _run(off, [GenerationRequest(prompt, 8, logprobs=2)])
        assert_same_greedy_tokens(np.array([_tokens(ev)]), np.array([_tokens(plain)]), _margins(plain)[None], tie=TIE)
        n = len(_tokens(ev))
        assert_close(np.array([e.logprob for e in ev[:n]]), np.array([e.logprob for e in plain[:n]]), rtol=1e-4,
                     atol=1e-5, name="log-probabilities with and without a hit")
    stats = engine.prefix_cache.stats
    assert (stats.lookups, stats.hits, stats.hit_tokens) == (7, 5, 75 + 32 + 50 + 9 + 32)
    assert engine.stats.prefilled_tokens == sum(map(len, order)) - stats.hit_tokens


def test_prefix_cache_is_bounded_by_bytes(rng):
    """The LRU keeps at most its capacity; the least recently used snapshot goes first; a hit refreshes one."""
    model, params = _model()
    one = model.prefill(params, jnp.zeros((1, 1), jnp.int32))[1]  # a one-row cache
    size = sum(a.nbytes for a in jax.tree_util.tree_leaves(one)) + 264 * 4
    cache = PrefixCache(capacity_bytes=3 * size + 3 * 40 * 4, interval=32)
    prompts = [np.asarray(_prompt(rng, 10)) for _ in range(4)]
    logits = jnp.zeros((1, 264))
    for p in prompts[:3]:
        cache.store(cache.chain(p), 10, one, logits)
    assert cache.lookup(cache.chain(prompts[0])) is not None  # refresh the oldest
    cache.store(cache.chain(prompts[3]), 10, one, logits)  # evicts prompts[1], the least recently used
    assert len(cache) == 3 and cache.nbytes <= cache.capacity_bytes and cache.stats.evicted == 1
    assert cache.lookup(cache.chain(prompts[1])) is None
    assert all(cache.lookup(cache.chain(prompts[i])) is not None for i in (0, 2, 3))
    huge = PrefixCache(capacity_bytes=10, interval=32)
    huge.store(huge.chain(prompts[0]), 10, one, logits)
    assert len(huge) == 0 and huge.nbytes == 0


def test_cancel_frees_the_slot_within_one_step_and_the_queue_takes_it(rng):
    engine = _engine()
    handles, events = [], [[] for _ in range(3)]
    for i in range(3):  # one more than the slots
        handles.append(engine.submit(GenerationRequest(_prompt(rng, 4), 60, seed=i), events[i].append))
    for _ in range(4):
        engine.step()
    assert engine.running == 2 and engine.queued == 1 and engine.decode_batch == 2
    engine.cancel(handles[0])  # row 0: the request in row 1 moves into it
    engine.step()  # the cancelled slot is freed and the queued request's prefill starts in the same step
    assert events[0][-1].finish_reason == "cancelled" and events[0][-1].token is None
    assert engine.queued == 0 and engine.slots_used == 2 and events[2][0].index == 0  # admitted, first token out
    engine.cancel_all()
    engine.step()
    assert engine.idle and engine.decode_batch == 1


def test_queue_bound_drain_and_bad_requests(rng):
    engine = _engine(EngineConfig(**{**CONFIG.__dict__, "max_queue": 2}))
    for _ in range(2):
        engine.submit(GenerationRequest(_prompt(rng, 3), 2), lambda e: None)
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest(_prompt(rng, 3), 2), lambda e: None)
    assert engine.stats.requests_rejected == 1
    engine.drain()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(_prompt(rng, 3), 2), lambda e: None)
    engine.run_until_idle()  # what was accepted still runs
    assert engine.idle and engine.stats.requests_finished == 2
    bad = {
        "at least one token": GenerationRequest((), 2),
        "at most 256": GenerationRequest((1,) * 257, 2),
        "out of range 0..271": GenerationRequest((1, 272), 2),
        "max_new_tokens must be an integer in 1..64": GenerationRequest((1,), 65),
        "logprobs must be in 0..5": GenerationRequest((1,), 2, logprobs=6),
    }
    for message, request in bad.items():
        with pytest.raises(ValueError, match=message):
            engine.check(request)


def test_eos_ends_a_request_and_penalties_change_the_tokens(rng):
    """A request stops at the model's EOS (the EOS is its last token, finish "stop"); a presence penalty far
    above the logits keeps a greedy row from repeating a token."""
    prompt = _prompt(rng, 6)
    engine = _engine()
    (plain,) = _run(engine, [GenerationRequest(prompt, 30)])
    tokens = _tokens(plain)
    eos = tokens[3]
    stopping = _engine(eos_token_id=eos)
    (ev,) = _run(stopping, [GenerationRequest(prompt, 30)])
    first = tokens.index(eos)
    assert _tokens(ev) == tokens[:first + 1] and ev[-1].finish_reason == "stop"
    (ignoring,) = _run(stopping, [GenerationRequest(prompt, 30, ignore_eos=True)])
    assert _tokens(ignoring) == tokens
    assert len(set(tokens)) < len(tokens)  # the tiny model repeats itself unpenalised
    (penalised,) = _run(engine, [GenerationRequest(prompt, 30, penalties=Penalties(presence=1e3))])
    out = _tokens(penalised)
    assert len(set(out)) == len(out) and out[0] == tokens[0]


@pytest.mark.long
def test_engine_on_meshes_equals_one_device():
    """Data-parallel slots, fully sharded and tensor-parallel weights: 4 host devices in a subprocess
    (tests/serve_mesh_check.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    proc = subprocess.run([sys.executable, str(root / "tests" / "serve_mesh_check.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("equal the one-device engine's") == 3

"""Speculative generation (``ssdkit.generate(..., speculative=...)``) against plain generation, on tiny Mamba-2s.

Greedy: the speculative loop verifies drafts with the chunked scan and commits with ``ssd_commit`` where
plain decoding steps one token at a time; the two programs' logits differ by float32 rounding (1e-4
relative, as in test_mamba2_model), so tokens are compared with ``assert_same_greedy_tokens`` and a tie
bound of twice that, taken from the logits' scale. Every test also asserts that drafts were checked and
accepted, so that equality is not reached by never speculating.

Sampling: the output distribution must be the target's. A chi-square test compares the counts of the
tokens of many independent rows against the exact probabilities from ``forward`` over every continuation
(fixed seeds; the test fails at p < 1e-4, so a correct loop fails it with a chance of 1e-4 per seed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

import ssdkit
from ssdkit import DraftModel, Greedy, PromptLookup, Sample, Speculative
from ssdkit.inference.costs import estimate_round_costs, measure_round_costs
from ssdkit.inference.drafts import queue_width
from ssdkit.inference.speculative import speculative_loop
from ssdkit.models import mamba2
from tests.helpers import assert_same_greedy_tokens, count_jaxpr_eqns, greedy_margins

# Compares floats from compiled programs: rerun with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (README).
pytestmark = pytest.mark.numerics

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=24, pad_vocab_size_multiple=8, d_state=8, headdim=16,
                          chunk_size=8, tie_embeddings=False)
DRAFT_CFG = dataclasses.replace(CFG, n_layer=1)
MODEL, DRAFT = mamba2.Mamba2LM(CFG), mamba2.Mamba2LM(DRAFT_CFG)
COSTS = (1.0, 1.5, 1.7, 2.0, 2.5)  # fixed round costs for Speculative(draft_tokens=8): no timing in tests


def _params(cfg, seed=0, scale=3.0):
    """Random weights whose greedy text varies (a tied or small head soon repeats one token for ever)."""
    params = mamba2.init_params(cfg, jax.random.key(seed))
    return dataclasses.replace(params, embedding=params.embedding * scale, lm_head=params.lm_head * 8)


PARAMS = _params(CFG)
LAYER_SKIP = dataclasses.replace(PARAMS, layers=PARAMS.layers[:1])  # the target's first layer drafts


def _prompts(batch, seq, seed=0, period=5):
    """Rows that repeat a short random pattern (prompt lookup finds matches) with a random tail."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        pattern = rng.integers(0, CFG.vocab_size, period)
        rows.append(np.concatenate([np.tile(pattern, seq // period + 1)[: seq - 2], rng.integers(0, 24, 2)]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _greedy_margins(prompt, lengths, tokens, out_lengths):
    """The top-2 logit gap behind each expected token, from forward over prompt + tokens, and the tie bound."""
    margins = np.full(tokens.shape, np.inf)
    scale = 0.0
    for b in range(tokens.shape[0]):
        n = int(out_lengths[b])
        seq = jnp.concatenate([prompt[b, : lengths[b]], tokens[b, :n]])[None]
        logits = np.asarray(mamba2.forward(PARAMS, CFG, seq)[0, lengths[b] - 1: lengths[b] - 1 + n, :CFG.vocab_size])
        margins[b, :n] = greedy_margins(logits)
        scale = max(scale, float(np.max(np.abs(logits))))
    return margins, 2 * 1e-4 * scale


@pytest.mark.parametrize("speculative,draft_params", [
    (Speculative(PromptLookup(), adaptive=False), None),
    (Speculative(PromptLookup(max_ngram=2), draft_tokens=5, round_costs=(1.0, 1.2, 1.3, 1.5, 1.8)), None),
    (Speculative(DraftModel(DRAFT), draft_tokens=3, adaptive=False), LAYER_SKIP),
    # drafting with the target itself: also run by default in test_adaptive_length_drafts_long_when_drafts_hold
    pytest.param(Speculative(DraftModel(MODEL), adaptive=False), PARAMS, marks=pytest.mark.long),
], ids=["lookup", "lookup-adaptive", "layer-skip-draft", "self-draft"])
def test_greedy_equals_plain_greedy(speculative, draft_params):
    """Right-padded rows of different lengths, an EOS: the tokens of plain greedy decoding, row by row."""
    prompt, lengths = _prompts(3, 30, seed=1), jnp.asarray([30, 22, 27], jnp.int32)
    plain = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=40, prompt_lengths=lengths, eos_token_id=3)
    spec = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=40, prompt_lengths=lengths, eos_token_id=3,
                           speculative=speculative, draft_params=draft_params)
    margins, tie = _greedy_margins(prompt, lengths, plain.tokens, plain.lengths)
    assert_same_greedy_tokens(spec.tokens, plain.tokens, margins, tie=tie, name="speculative vs plain greedy")
    if np.array_equal(spec.tokens, plain.tokens):
        np.testing.assert_array_equal(spec.lengths, plain.lengths)
    stats = spec.speculation
    assert int(stats.verifies) > 0 and int(np.sum(stats.accepted)) > 0, stats
    assert int(stats.passes) <= int(np.max(spec.lengths)) - 1  # never more target passes than plain decoding
    assert np.all(np.asarray(stats.accepted) <= np.asarray(stats.drafted))
    if isinstance(speculative.draft, DraftModel) and draft_params is PARAMS:  # drafting with the target itself
        assert stats.acceptance_rate > 0.9


def test_rows_accept_independently():
    """One row whose drafts all hold (a self-draft can only lose to near ties) next to rows of other
    prompts: acceptance is counted per row, and the rows' tokens equal each row generated alone."""
    prompt = _prompts(4, 20, seed=5)
    spec = Speculative(PromptLookup(), draft_tokens=4, adaptive=False)
    res = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=30, speculative=spec)
    accepted = np.asarray(res.speculation.accepted)
    assert len(set(accepted.tolist())) > 1, accepted  # rows differ: per-row acceptance, not batch-wide
    for b in range(4):
        alone = ssdkit.generate(MODEL, PARAMS, prompt[b:b + 1], max_new_tokens=30)
        margins, tie = _greedy_margins(prompt[b:b + 1], [20], alone.tokens, alone.lengths)
        assert_same_greedy_tokens(res.tokens[b], alone.tokens[0], margins[0], tie=tie, name=f"row {b}")


def _exact_distribution(prompt, steps, sampler):
    """P(t_1 .. t_steps) for every continuation, in float64, from forward's logits and the sampler's cuts."""
    vocab = CFG.padded_vocab_size
    probs = {(): 1.0}
    for _ in range(steps):
        seqs = list(probs)
        batch = jnp.asarray([list(prompt) + list(s) for s in seqs], jnp.int32)
        logits = mamba2.forward(PARAMS, CFG, batch)[:, -1]
        p = np.asarray(jax.nn.softmax(sampler.filtered_logits(logits), axis=-1), np.float64)
        probs = {s + (t,): probs[s] * p[i, t] for i, s in enumerate(seqs) for t in range(vocab) if p[i, t] > 0}
    return probs


def _chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """Pearson's test; cells expected below 5 are pooled. Returns the p-value."""
    observed, expected, pool_o, pool_e = [], [], 0.0, 0.0
    for cell, p in probs.items():
        if n * p >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(n * p)
        else:
            pool_o, pool_e = pool_o + counts.get(cell, 0), pool_e + n * p
    assert sum(counts.values()) == n and not set(counts) - set(probs), "a continuation of probability 0 was drawn"
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    o, e = np.asarray(observed, np.float64), np.asarray(expected, np.float64)
    stat = float(np.sum((o - e) ** 2 / e))
    dof = len(o) - 1
    return float(gammaincc(dof / 2.0, stat / 2.0)), stat, dof


@pytest.mark.parametrize("sampler,speculative,draft_params", [
    # another draft's q: the same acceptance path as the layer-skip draft's (confidence: -m long)
    pytest.param(Sample(1.0), Speculative(DraftModel(DRAFT), draft_tokens=2, adaptive=False),
                 _params(DRAFT_CFG, seed=9), marks=pytest.mark.long),
    (Sample(0.8, top_k=6), Speculative(DraftModel(DRAFT), draft_tokens=2, adaptive=False), LAYER_SKIP),
    (Sample(1.0, top_p=0.9), Speculative(PromptLookup(min_ngram=1), draft_tokens=2, adaptive=False), None),
], ids=["other-draft", "layer-skip-top-k", "lookup-top-p"])
def test_sampling_has_the_target_distribution(sampler, speculative, draft_params):
    """4,000 independent rows of the same prompt: tokens 2 and 3 (drawn in one round of 2 drafts: accepted
    drafts, residual corrections, bonus tokens) jointly with token 1 follow the target's distribution."""
    n, steps = 4000, 3
    prompt = np.asarray(_prompts(1, 12, seed=3)[0])
    batch = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (n, 1))
    res = ssdkit.generate(MODEL, PARAMS, batch, max_new_tokens=steps, sampler=sampler, key=jax.random.key(7),
                          speculative=speculative, draft_params=draft_params)
    stats = res.speculation
    accepted, drafted = int(np.sum(stats.accepted)), int(np.sum(stats.drafted))
    assert accepted >= 50 and drafted - accepted >= 50, f"{accepted} of {drafted} drafts accepted: the test " \
        "needs both accepted and rejected drafts"
    tokens = np.asarray(res.tokens)
    counts: dict = {}
    for row in map(tuple, tokens):
        counts[row] = counts.get(row, 0) + 1
    probs = _exact_distribution(prompt, steps, sampler)
    p_value, stat, dof = _chi_square_p(counts, probs, n)
    assert p_value > 1e-4, f"chi-square {stat:.1f} on {dof} degrees of freedom: p = {p_value:.2e}"


def test_adaptive_length_stops_drafting_when_drafts_fail():
    """Drafts that never hold (a draft model of other weights, greedy) and a verify as dear as 3 steps:
    after at most a few rounds the loop decodes plainly, and its evidence (the draft's guesses at each
    token, made anyway) keeps it there."""
    prompt = _prompts(1, 16, seed=2)
    spec = Speculative(DraftModel(DRAFT), draft_tokens=4, round_costs=(1.0, 3.0, 3.5, 4.0))
    res = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=300, speculative=spec,
                          draft_params=_params(DRAFT_CFG, seed=11, scale=0.1))
    stats = res.speculation
    assert int(stats.verifies) <= 3, stats
    plain = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=300)
    margins, tie = _greedy_margins(prompt, [16], plain.tokens, plain.lengths)
    assert_same_greedy_tokens(res.tokens, plain.tokens, margins, tie=tie)


@pytest.mark.parametrize("sampler", [Greedy(), Sample(1.0)], ids=["greedy", "sampling"])
def test_adaptive_length_drafts_long_when_drafts_hold(sampler):
    """The target drafting for itself: every draft holds. The costs make the prior (α = 1/2) choose plain
    rounds, which queue their tokens for the draft; feeding the full queue shows the draft guessing right
    (the evidence), and from then on every round drafts K, from a draft cache the queue kept in step."""
    prompt = _prompts(1, 16, seed=2)
    costs = (1.0, 1.5, 1.7, 2.0, 2.5)
    spec = Speculative(DraftModel(MODEL), draft_tokens=8, round_costs=costs)
    new_tokens, queue = 200, queue_width(8)
    res = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=new_tokens, speculative=spec, draft_params=PARAMS,
                          sampler=sampler, key=jax.random.key(3))
    stats = res.speculation
    assert stats.acceptance_rate > 0.9, stats  # p = q up to rounding: a sampled draft holds too
    # plain rounds until the queue is first fed, then most rounds emit 9 tokens
    assert int(stats.passes) <= queue + (new_tokens - queue) / 4, stats
    assert int(stats.drafted[0]) >= 6 * int(stats.verifies), stats
    assert int(stats.passes) > int(stats.verifies) >= 1  # plain rounds first, then drafting rounds


def test_eos_and_short_buffers():
    """A row stops at its EOS even inside a round of accepted drafts; the buffer never overflows."""
    prompt = _prompts(2, 20, seed=4)
    for max_new in (1, 6):  # a buffer shorter than one round's 9 tokens
        plain = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=max_new, eos_token_id=5)
        spec = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=max_new, eos_token_id=5,
                               speculative=Speculative(draft_tokens=8, adaptive=False))
        margins, tie = _greedy_margins(prompt, [20, 20], plain.tokens, plain.lengths)
        assert_same_greedy_tokens(spec.tokens, plain.tokens, margins, tie=tie)
        assert spec.tokens.shape == (2, max_new)
    # a pattern whose continuation holds an EOS: lookup drafts it, and the row ends there
    pattern = jnp.asarray([[7, 8, 5, 9, 7, 8, 5, 9, 7, 8, 5, 9, 7, 8]], jnp.int32)
    res = ssdkit.generate(MODEL, PARAMS, pattern, max_new_tokens=12, eos_token_id=5,
                          speculative=Speculative(adaptive=False))
    n = int(res.lengths[0])
    assert 5 not in np.asarray(res.tokens[0, : n - 1]).tolist()
    assert np.all(np.asarray(res.tokens[0, n:]) == 0)


def test_prompt_lookup_proposals():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    history = jnp.asarray([
        [1, 2, 3, 4, 5, 1, 2, 3, 0, 0],  # "1 2 3" occurred before: propose 4 5 1 (then the known 2 3)
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # nothing repeats: no proposal
        [4, 4, 4, 4, 4, 0, 0, 0, 0, 0],  # a run: the earliest match is followed by the most known tokens
        [1, 2, 9, 2, 7, 7, 2, 0, 0, 0],  # only the 1-gram "2" occurred before, twice, both with 3 tokens after
    ], jnp.int32)
    drafts, count = lookup.lookup(history, jnp.asarray([8, 10, 5, 7]), 3)
    np.testing.assert_array_equal(count, [3, 0, 2, 3])
    np.testing.assert_array_equal(drafts[0], [4, 5, 1])
    np.testing.assert_array_equal(drafts[2, :2], [4, 4])
    np.testing.assert_array_equal(drafts[3], [7, 7, 2])  # the more recent of the two


def test_traced_program_does_not_grow_with_max_new_tokens():
    def n_eqns(max_new):
        fn = functools.partial(speculative_loop, MODEL, max_new_tokens=max_new, sampler=Sample(0.9, top_k=5),
                               eos_token_id=3, pad_token_id=0,
                               speculative=Speculative(DraftModel(DRAFT), draft_tokens=4, round_costs=COSTS[:4]))
        return count_jaxpr_eqns(jax.make_jaxpr(fn)(PARAMS, LAYER_SKIP, _prompts(2, 9), None, jax.random.key(0)).jaxpr)

    assert n_eqns(8) == n_eqns(300)


def test_measure_round_costs_is_an_explicit_tool():
    spec = Speculative(draft_tokens=4)
    costs = measure_round_costs(MODEL, PARAMS, _prompts(1, 8), spec, rounds=2, repeats=1)
    assert len(costs) == len(spec.draft_lengths) == 4 and costs[0] == 1.0 and all(c > 0 for c in costs)
    Speculative(draft_tokens=4, round_costs=costs)  # a valid setting


@pytest.mark.parametrize("draft", [PromptLookup(), DraftModel(DRAFT)], ids=["lookup", "draft-model"])
def test_estimated_round_costs_are_deterministic_and_grow_with_k(draft):
    """The default costs come from the programs' shapes (XLA's cost analysis of the lowered programs):
    the same on every call, 1 for a plain round, and dearer for more drafts."""
    spec = Speculative(draft, draft_tokens=4)
    prompt = _prompts(2, 9)
    draft_params = None if isinstance(draft, PromptLookup) else LAYER_SKIP

    def estimate():
        _, cache = MODEL.prefill(PARAMS, prompt)
        state = draft.start(draft_params, prompt, None, prompt[:, -1], 8, 4, CFG.padded_vocab_size)
        return estimate_round_costs(MODEL, PARAMS, draft_params, cache, state, spec, Greedy(), 2)

    costs = estimate()
    assert costs == estimate()
    assert costs[0] == 1.0 and all(a < b for a, b in zip(costs, costs[1:], strict=False)), costs


def test_adaptive_sampling_is_a_pure_function_of_its_inputs(monkeypatch):
    """Adaptive drafting with estimated costs under sampling: two calls with the same key give the same
    tokens, though every clock and the measuring tool answer differently in each (and the second call
    traces and estimates afresh): nothing timing-dependent reaches the draft lengths."""
    import time

    import ssdkit.inference.costs as costs_module

    spec = Speculative(DraftModel(DRAFT), draft_tokens=4)
    prompt = _prompts(2, 12, seed=3)
    runs = []
    for run in range(2):
        clock = iter(range(0, 10**9, 1 + 1000 * run))
        monkeypatch.setattr(time, "perf_counter", lambda clock=clock: float(next(clock)))
        monkeypatch.setattr(costs_module, "measure_round_costs", lambda *a, run=run, **k: (1.0, 9.0 * run, 2.0, 3.0))
        jax.clear_caches()
        res = ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=24, speculative=spec, draft_params=LAYER_SKIP,
                              sampler=Sample(1.0), key=jax.random.key(7))
        runs.append(res)
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_array_equal(runs[0].speculation.drafted, runs[1].speculation.drafted)


def test_bad_requests_are_refused():
    prompt = _prompts(1, 8)

    @dataclasses.dataclass(frozen=True)
    class NoVerify:
        def prefill(self, params, tokens, lengths=None):
            return MODEL.prefill(params, tokens, lengths)

        def decode(self, params, token, cache):
            return MODEL.decode(params, token, cache)

    with pytest.raises(TypeError, match="lacks verify, commit"):
        ssdkit.generate(NoVerify(), PARAMS, prompt, max_new_tokens=4, speculative=Speculative())
    with pytest.raises(TypeError, match="draft model .* lacks verify, commit"):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4, speculative=Speculative(DraftModel(NoVerify())),
                        draft_params=PARAMS)
    with pytest.raises(ValueError, match="needs its parameters"):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4, speculative=Speculative(DraftModel(DRAFT)))
    with pytest.raises(ValueError, match="only for a source with a model"):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4, speculative=Speculative(), draft_params=PARAMS)
    with pytest.raises(ValueError, match="pass speculative="):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4, draft_params=PARAMS)
    with pytest.raises(TypeError, match="sampler's distribution"):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4, sampler=lambda logits, key: jnp.argmax(logits, -1),
                        key=jax.random.key(0), speculative=Speculative(adaptive=False))
    other = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=40, d_state=8, headdim=16, chunk_size=8)
    with pytest.raises(ValueError, match="the target's vocabulary"):
        ssdkit.generate(MODEL, PARAMS, prompt, max_new_tokens=4,
                        draft_params=mamba2.init_params(other, jax.random.key(0)),
                        speculative=Speculative(DraftModel(mamba2.Mamba2LM(other)), adaptive=False))
    for bad in (dict(draft_tokens=0), dict(draft_tokens=2.5), dict(round_costs=(1.0, 2.0)),
                dict(round_costs=(1.0, 2.0, -1.0, 3.0, 4.0)), dict(draft="lookup")):
        with pytest.raises((TypeError, ValueError), match="Speculative"):
            Speculative(**bad)
    for bad in (dict(max_ngram=0), dict(min_ngram=4, max_ngram=2)):
        with pytest.raises(ValueError, match="PromptLookup"):
            PromptLookup(**bad)


def test_draft_lengths():
    assert Speculative(draft_tokens=8).draft_lengths == (0, 1, 2, 4, 8)
    assert Speculative(draft_tokens=6).draft_lengths == (0, 1, 2, 4, 6)
    assert Speculative(draft_tokens=1).draft_lengths == (0, 1)
    assert Speculative(draft_tokens=5, adaptive=False).draft_lengths == (0, 5)

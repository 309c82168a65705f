"""Speculative generation (``ssdkit.generate(..., speculative=...)``) against the target's own text, on tiny
Mamba-2s.

Greedy: the speculative loop verifies drafts with the chunked scan and commits with ``ssd_commit``; its
tokens must be plain greedy decoding's, i.e. each the argmax of the target's logits after the prompt and
the row's earlier tokens. ``forward`` over prompt + tokens gives those logits (one call for every row and
position: teacher forcing); they differ from the loop's by float32 rounding (1e-4 relative, as in
test_mamba2_model), so tokens are compared with ``assert_same_greedy_tokens`` and a tie bound of twice
that, taken from the logits' scale (plain decoding against forward: test_mamba2_model, test_generate).
Every test also asserts that drafts were checked and accepted, so that equality is not reached by never
speculating.

Sampling: the output distribution must be the target's. A chi-square test compares the counts of the
tokens of many independent rows against the exact probabilities from ``forward`` over every continuation
(fixed seeds; the test fails at p < 1e-4, so a correct loop fails it with a chance of 1e-4 per seed).

Compilation is nearly all of these tests' time (the speculative loop compiles one program per model,
sampler, ``Speculative``, ``max_new_tokens``, EOS id and prompt shape), so the greedy tests share two
programs: :data:`LOOKUP` and :data:`DRAFTING`, both run on (B, P) prompts with ``prompt_lengths``, EOS
:data:`EOS` and :data:`N` new tokens; they differ only in the weights and prompts they pass.

No numerics mark: token ids are compared up to near ties, distributions by a statistical test and stats
by bounds with room, none of which depends on one CPU's rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

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
from tests.helpers import assert_same_greedy_tokens, count_jaxpr_eqns, greedy_margins, speculative_lookup_setup

# Shared with tests/test_mamba2_layout.py, which inspects the LOOKUP program (tests/helpers.py).
CFG, LOOKUP, _CONVENTION = speculative_lookup_setup()
DRAFT_CFG = dataclasses.replace(CFG, n_layer=1)
MODEL, DRAFT = mamba2.Mamba2LM(CFG), mamba2.Mamba2LM(DRAFT_CFG)


def _params(cfg, seed=0, scale=3.0):
    """Random weights whose greedy text varies (a tied or small head soon repeats one token for ever)."""
    params = mamba2.init_params(cfg, jax.random.key(seed))
    return dataclasses.replace(params, embedding=params.embedding * scale, lm_head=params.lm_head * 8)


@functools.cache
def _weights(name: str):
    """The tests' weights, made on first use (not at import: every xdist worker imports every module)."""
    if name == "target":
        return _params(CFG)
    target = _weights("target")
    second = target.layers[1]
    return {
        "layer-skip": lambda: dataclasses.replace(target, layers=target.layers[:1]),  # the target's first layer
        # the target with a second layer that adds nothing to the residual stream: its first layer alone
        # (the layer-skip draft) computes its logits, so every draft holds (up to the programs' rounding)
        "null-second": lambda: dataclasses.replace(target, layers=(
            target.layers[0], dataclasses.replace(second, out_proj=second.out_proj * 0.0))),
        # a second layer that adds little: the first layer's guesses mostly hold (93-97% on these prompts)
        "weak-second": lambda: dataclasses.replace(target, layers=(
            target.layers[0], dataclasses.replace(second, out_proj=second.out_proj * 0.15))),
        "other-draft": lambda: _params(DRAFT_CFG, seed=9),
        "failing-draft": lambda: _params(DRAFT_CFG, seed=11, scale=0.1),  # its guesses (nearly) never hold
        "cycle": lambda: _params(CFG, seed=6),  # greedy text cycling through the EOS (test_eos_inside_...)
    }[name]()


# The greedy tests' one calling convention (each new value of any of these is a new compiled program).
B, P, N, EOS = (_CONVENTION[k] for k in ("batch", "prompt_len", "max_new_tokens", "eos_token_id"))
# LOOKUP: prompt lookup, adaptive, K = 4, with round costs (1, 1.2, 1.3, 1.5) at which the prior (α = 1/2)
# already drafts when rows can.
# The one-layer draft model, adaptive: at the prior (α = 1/2) no draft length gains 10% over a plain round
# (1.5 / 1.5, 1.75 / 1.7, 1.94 / 2.0 tokens per cost), so it decodes plainly until the evidence of its
# queue says that drafts hold; at α >= 0.6 a round of 4 drafts gains (2.31 / 2.0).
DRAFTING = Speculative(DraftModel(DRAFT), draft_tokens=4, round_costs=(1.0, 1.5, 1.7, 2.0))


def _prompts(batch, seq, seed=0, period=5):
    """Rows that repeat a short random pattern (prompt lookup finds matches) with a random tail."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        pattern = rng.integers(0, CFG.vocab_size, period)
        rows.append(np.concatenate([np.tile(pattern, seq // period + 1)[: seq - 2], rng.integers(0, 24, 2)]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _generate(prompt, lengths=(P,) * B, params="target", draft_params=None, **kwargs):
    """``ssdkit.generate`` in the greedy tests' convention: (B, P) prompts, their lengths, N tokens, EOS
    (weights by name: :func:`_weights`)."""
    return ssdkit.generate(MODEL, _weights(params), prompt, max_new_tokens=kwargs.pop("max_new_tokens", N),
                           prompt_lengths=jnp.asarray(lengths, jnp.int32), eos_token_id=EOS,
                           draft_params=None if draft_params is None else _weights(draft_params), **kwargs)


def _assert_greedy_text(res, prompt, lengths=(P,) * B, params="target", max_new=N):
    """Each row is the target's greedy text: every token the argmax of ``forward``'s logits after the
    prompt and the row's earlier tokens (plain greedy decoding's choice), up to near ties; the row ends at
    its first EOS or after ``max_new`` tokens, padding after.

    ``forward`` over the prompt and the row's own tokens (teacher forcing: every row in one (B, P + N)
    call, right-padded; it is causal) is a third program: its logits differ from the loop's by float32
    rounding (1e-4 relative, as in test_mamba2_model), so a choice whose top-2 gap is below twice that,
    taken from the logits' scale, may go either way (``assert_same_greedy_tokens``)."""
    tokens, out_lengths = np.asarray(res.tokens), np.asarray(res.lengths)
    rows = np.zeros((B, P + N), np.int32)
    for b in range(B):
        seq = np.concatenate([np.asarray(prompt[b, : lengths[b]]), tokens[b, : out_lengths[b]]])
        rows[b, : len(seq)] = seq
    logits = np.asarray(mamba2.forward(_weights(params), CFG, jnp.asarray(rows)))[..., : CFG.vocab_size]
    greedy, margins = np.zeros_like(tokens), np.full(tokens.shape, np.inf)
    scale = 0.0
    for b in range(B):
        n, start = int(out_lengths[b]), int(lengths[b]) - 1
        at = logits[b, start: start + n]  # the logits behind tokens[b, :n]
        greedy[b, :n], margins[b, :n] = np.argmax(at, axis=-1), greedy_margins(at)
        scale = max(scale, float(np.max(np.abs(at))))
        ended = tokens[b, n - 1] == EOS and EOS not in tokens[b, : n - 1].tolist()
        assert ended or (n == max_new and EOS not in tokens[b, :n].tolist()), (b, tokens[b, :n].tolist())
        assert np.all(tokens[b, n:] == 0), f"row {b}: no padding after its {n} tokens"
    assert tokens.shape == (B, max_new)
    assert_same_greedy_tokens(tokens, greedy, margins, tie=2 * 1e-4 * scale, name="speculative vs greedy")


# ------------------------------------------------------------------------------ greedy: prompt lookup
def test_greedy_lookup_equals_plain_greedy():
    """Right-padded rows of different lengths, an EOS: the tokens of plain greedy decoding, row by row."""
    prompt, lengths = _prompts(B, P, seed=1), (16, 10, 13)
    spec = _generate(prompt, lengths, speculative=LOOKUP)
    _assert_greedy_text(spec, prompt, lengths)
    assert np.any(np.asarray(spec.lengths) < N), spec.lengths  # a row ended at its EOS
    stats = spec.speculation
    assert int(stats.verifies) > 0 and int(np.sum(stats.accepted)) > 0, stats
    assert int(stats.passes) <= int(np.max(spec.lengths)) - 1  # never more target passes than plain decoding
    assert np.all(np.asarray(stats.accepted) <= np.asarray(stats.drafted))


def test_rows_accept_independently():
    """Rows of other prompts side by side: acceptance is counted per row, and each row's tokens are those
    of plain greedy decoding of that row."""
    prompt = _prompts(B, P, seed=5)
    res = _generate(prompt, speculative=LOOKUP)
    accepted = np.asarray(res.speculation.accepted)
    assert len(set(accepted.tolist())) > 1, accepted  # rows differ: per-row acceptance, not batch-wide
    _assert_greedy_text(res, prompt)


def test_eos_inside_a_round_of_drafts():
    """Weights whose greedy text cycles through the EOS, and prompts that are that cycle: lookup drafts the
    cycle, the EOS among them, and the target accepts it; each row ends at its EOS (the round's later
    tokens dropped, the rest of the row padding): plain greedy decoding's tokens and lengths."""
    cycle = [21, 15, 22, EOS, 21, 4, 2, 6, 13]  # the "cycle" weights' greedy text
    rows, lengths = [(cycle * 3)[3:19], (cycle * 3)[1:17], (cycle * 3)[5:17]], (16, 16, 12)
    prompt = jnp.asarray([r + [0] * (P - len(r)) for r in rows], jnp.int32)
    res = _generate(prompt, lengths, params="cycle", speculative=LOOKUP)
    _assert_greedy_text(res, prompt, lengths, params="cycle")
    np.testing.assert_array_equal(res.lengths[:2], [3, 5])  # 15 22 EOS; 13 21 15 22 EOS
    assert res.tokens.shape == (B, N)
    for b in range(B):
        n = int(res.lengths[b])
        assert np.asarray(res.tokens[b, n - 1]) == EOS and EOS not in np.asarray(res.tokens[b, : n - 1]).tolist()
        assert np.all(np.asarray(res.tokens[b, n:]) == 0)
    assert int(res.speculation.accepted[0]) >= 2, res.speculation  # 22 and the EOS: drafts of one round


# ------------------------------------------------------------------------------ greedy: a draft model
def test_greedy_draft_model_equals_plain_greedy():
    """The target's first layer drafts (most drafts hold, some not: the draft's cache rolls back to the
    accepted prefix) for right-padded rows of different lengths: plain greedy decoding's tokens."""
    prompt, lengths = _prompts(B, P, seed=1), (16, 10, 13)
    spec = _generate(prompt, lengths, params="weak-second", speculative=DRAFTING, draft_params="layer-skip")
    _assert_greedy_text(spec, prompt, lengths, params="weak-second")
    stats = spec.speculation
    accepted, drafted = int(np.sum(stats.accepted)), int(np.sum(stats.drafted))
    assert int(stats.verifies) > 0 and 0 < accepted < drafted, stats  # drafts held and failed
    assert int(stats.passes) <= int(np.max(spec.lengths)) - 1


def test_adaptive_length_stops_drafting_when_drafts_fail():
    """Drafts that never hold (a draft model of other weights): the loop decodes plainly, and its evidence
    (the draft's guesses at each token, made anyway when its queue is fed) keeps it there."""
    prompt = _prompts(B, P, seed=2)
    res = _generate(prompt, speculative=DRAFTING, draft_params="failing-draft")
    stats = res.speculation
    # the premise: a row outlives the plain rounds that fill the queue, so the evidence was read
    assert int(np.max(res.lengths)) > queue_width(DRAFTING.draft_tokens) + 1, res.lengths
    assert int(stats.verifies) <= 3, stats
    _assert_greedy_text(res, prompt)


# Sampling: -m long (its own program). The adaptive rule is the sampler's; its sampled evidence is checked
# directly by test_sampled_evidence_is_the_acceptance_chance.
@pytest.mark.parametrize("sampler", [Greedy(), pytest.param(Sample(1.0, top_k=4), marks=pytest.mark.long)],
                         ids=["greedy", "sampling"])  # top-k: few rows draw the EOS before the queue is fed
def test_adaptive_length_drafts_long_when_drafts_hold(sampler):
    """A draft that equals the target ("null-second"): every draft holds. The prior (α = 1/2) chooses plain
    rounds, which queue their tokens for the draft; feeding the full queue shows the draft guessing right
    (the evidence), and from then on every round drafts K, from a draft cache the queue kept in step.
    (Sampling: the evidence is each queued token's acceptance chance instead of a match; -m long.)"""
    prompt = _prompts(B, P, seed=2)
    big_k, queue = DRAFTING.draft_tokens, queue_width(DRAFTING.draft_tokens)
    key = None if isinstance(sampler, Greedy) else jax.random.key(3)  # a key for greedy: another program
    res = _generate(prompt, params="null-second", speculative=DRAFTING, draft_params="layer-skip", sampler=sampler,
                    key=key)
    stats = res.speculation
    longest = int(np.max(res.lengths))
    assert longest > queue + 1, res.lengths  # the premise: a row outlives the plain rounds that fill the queue
    assert stats.acceptance_rate > 0.9, stats  # p = q up to rounding: a sampled draft holds too
    # plain rounds until the queue is first fed, then most rounds emit K + 1 tokens
    assert int(stats.passes) <= queue + (longest - queue) / 4, stats
    assert int(np.max(stats.drafted)) >= 0.75 * big_k * int(stats.verifies), stats  # the longest row's drafts
    assert int(stats.passes) > int(stats.verifies) >= 1  # plain rounds first, then drafting rounds


@functools.partial(jax.jit, static_argnums=0)
def _queue_evidence(sampler, draft_params, prompt, text, logits):
    """A draft model following ``text`` through plain rounds until its queue is full, then fed it: the
    evidence (per row: held, trials) the adaptive rule then reads. ``logits[:, i]``: the target's after
    ``text[:, i]``."""
    source, width = DRAFTING.draft, queue_width(DRAFTING.draft_tokens)
    state = source.start(draft_params, prompt, None, text[:, 0], N, DRAFTING.draft_tokens, CFG.padded_vocab_size)

    def plain_round(state, i):  # fed text[:, i], the target produced text[:, i + 1]
        state, _ = source.follow(state, draft_params, sampler, text[:, i], text[:, i + 1], logits[:, i], None,
                                 None, None)
        return state, None

    state, _ = jax.lax.scan(plain_round, state, jnp.arange(width))
    assert_full = source.behind(state)
    state, evidence = source.catch_up(state, draft_params, sampler, text[:, width])
    return assert_full, evidence


def test_sampled_evidence_is_the_acceptance_chance():
    """Under sampling, a draft model's evidence for each queued token is its acceptance chance, min(1, q/p)
    of the token that followed: about 1 for a draft equal to the target, far less for one that fails."""
    prompt = _prompts(B, P, seed=2)
    text = np.asarray(_generate(prompt, params="null-second", speculative=DRAFTING, draft_params="layer-skip").tokens)
    width = queue_width(DRAFTING.draft_tokens)
    assert np.all(text[:, width] != 0), text  # the target's text runs past the queue (no EOS before)
    rows = jnp.asarray(np.concatenate([np.asarray(prompt), text], axis=1))
    logits = mamba2.forward(_weights("null-second"), CFG, rows)[:, P:]  # after text[:, 0], text[:, 1], ...
    sampler = Sample(1.0, top_k=4)
    chance = {}
    for draft in ("layer-skip", "failing-draft"):
        full, evidence = _queue_evidence(sampler, _weights(draft), prompt, jnp.asarray(text), logits)
        assert bool(full)
        np.testing.assert_array_equal(evidence.trials, np.full(B, width))
        chance[draft] = np.asarray(evidence.held) / width
    assert np.all(chance["layer-skip"] > 0.9) and np.all(chance["failing-draft"] < 0.5), chance


def test_one_new_token_runs_no_round():
    """max_new_tokens=1: the prefill's token, no round (the loop starts done)."""
    prompt = _prompts(B, P, seed=1)
    res = _generate(prompt, max_new_tokens=1, speculative=LOOKUP)
    _assert_greedy_text(res, prompt, max_new=1)
    np.testing.assert_array_equal(res.lengths, [1] * B)
    assert int(res.speculation.passes) == 0, res.speculation


@pytest.mark.long  # more sources and settings through the paths the tests above take (confidence)
@pytest.mark.parametrize("speculative,draft_params", [
    (Speculative(PromptLookup(), adaptive=False), None),
    (Speculative(PromptLookup(max_ngram=2), draft_tokens=5, round_costs=(1.0, 1.2, 1.3, 1.5, 1.8)), None),
    (Speculative(DraftModel(DRAFT), draft_tokens=3, adaptive=False), "layer-skip"),
    (Speculative(DraftModel(MODEL), adaptive=False), "target"),
], ids=["lookup-k8", "lookup-adaptive-k5", "layer-skip-k3", "self-draft-k8"])
def test_greedy_equals_plain_greedy_more_settings(speculative, draft_params):
    prompt, lengths = _prompts(B, P, seed=1), (16, 10, 13)
    spec = _generate(prompt, lengths, speculative=speculative, draft_params=draft_params)
    _assert_greedy_text(spec, prompt, lengths)
    stats = spec.speculation
    assert int(stats.verifies) > 0 and int(np.sum(stats.accepted)) > 0, stats
    assert int(stats.passes) <= int(np.max(spec.lengths)) - 1
    assert np.all(np.asarray(stats.accepted) <= np.asarray(stats.drafted))
    if draft_params == "target":  # drafting with the target itself
        assert stats.acceptance_rate > 0.9


# ------------------------------------------------------------------------------ sampling: the distribution
@functools.partial(jax.jit, static_argnums=0)
def _probabilities(sampler, logits):
    return jax.nn.softmax(sampler.filtered_logits(logits), axis=-1)


def _exact_distribution(prompt, steps, sampler):
    """P(t_1 .. t_steps) for every continuation, in float64, from forward's logits and the sampler's cuts.
    One forward over the prompt and every t_1 .. t_{steps-1}: causal, so its logits at position len(prompt)
    - 1 + i are those after prompt + t_1 .. t_i."""
    vocab = CFG.padded_vocab_size
    heads = np.asarray(list(itertools.product(range(vocab), repeat=steps - 1)), np.int32)
    batch = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(heads), 1)), heads], axis=1)
    logits = mamba2.forward(_weights("target"), CFG, jnp.asarray(batch))[:, len(prompt) - 1:]  # (heads, steps, vocab)
    p = np.asarray(_probabilities(sampler, logits), np.float64)
    rows = np.arange(len(heads))
    prefix = np.ones(len(heads))
    for i in range(steps - 1):
        prefix = prefix * p[rows, i, heads[:, i]]
    joint = prefix[:, None] * p[:, steps - 1]  # (heads, vocab)
    return {(*map(int, heads[h]), t): float(joint[h, t]) for h, t in zip(*np.nonzero(joint > 0), strict=True)}


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
                 "other-draft", marks=pytest.mark.long),
    (Sample(0.8, top_k=6), Speculative(DraftModel(DRAFT), draft_tokens=2, adaptive=False), "layer-skip"),
    (Sample(1.0, top_p=0.9), Speculative(PromptLookup(min_ngram=1), draft_tokens=2, adaptive=False), None),
], ids=["other-draft", "layer-skip-top-k", "lookup-top-p"])
def test_sampling_has_the_target_distribution(sampler, speculative, draft_params):
    """4,000 independent rows of the same prompt: tokens 2 and 3 (drawn in one round of 2 drafts: accepted
    drafts and residual corrections) jointly with token 1 follow the target's distribution. The round's
    3 tokens meet a buffer of 2: every row ends with exactly 3 tokens (the buffer never overflows)."""
    n, steps = 4000, 3
    prompt = np.asarray(_prompts(1, 12, seed=3)[0])
    batch = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (n, 1))
    res = ssdkit.generate(MODEL, _weights("target"), batch, max_new_tokens=steps, sampler=sampler,
                          key=jax.random.key(7), speculative=speculative,
                          draft_params=None if draft_params is None else _weights(draft_params))
    assert res.tokens.shape == (n, steps)
    np.testing.assert_array_equal(res.lengths, np.full(n, steps))
    stats = res.speculation
    accepted, drafted = int(np.sum(stats.accepted)), int(np.sum(stats.drafted))
    assert accepted >= 50 and drafted - accepted >= 50, f"{accepted} of {drafted} drafts accepted: the test " \
        "needs both accepted and rejected drafts"
    tokens = np.asarray(res.tokens)
    counts: dict = {}
    for row in map(tuple, tokens.tolist()):
        counts[row] = counts.get(row, 0) + 1
    probs = _exact_distribution(prompt, steps, sampler)
    p_value, stat, dof = _chi_square_p(counts, probs, n)
    assert p_value > 1e-4, f"chi-square {stat:.1f} on {dof} degrees of freedom: p = {p_value:.2e}"


# ------------------------------------------------------------------------------ pieces and settings
def test_prompt_lookup_proposals():
    lookup = PromptLookup(max_ngram=3, min_ngram=1)
    history = jnp.asarray([
        [1, 2, 3, 4, 5, 1, 2, 3, 0, 0],  # "1 2 3" occurred before: propose 4 5 1 (then the known 2 3)
        [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],  # nothing repeats: no proposal
        [4, 4, 4, 4, 4, 0, 0, 0, 0, 0],  # a run: the earliest match is followed by the most known tokens
        [1, 2, 9, 2, 7, 7, 2, 0, 0, 0],  # only the 1-gram "2" occurred before, twice, both with 3 tokens after
    ], jnp.int32)
    drafts, count = jax.jit(lookup.lookup, static_argnums=2)(history, jnp.asarray([8, 10, 5, 7]), 3)  # one compile
    np.testing.assert_array_equal(count, [3, 0, 2, 3])
    np.testing.assert_array_equal(drafts[0], [4, 5, 1])
    np.testing.assert_array_equal(drafts[2, :2], [4, 4])
    np.testing.assert_array_equal(drafts[3], [7, 7, 2])  # the more recent of the two


def test_traced_program_does_not_grow_with_max_new_tokens():
    def n_eqns(max_new):
        fn = functools.partial(speculative_loop, MODEL, max_new_tokens=max_new, sampler=Sample(0.9, top_k=5),
                               eos_token_id=3, pad_token_id=0, speculative=DRAFTING)
        args = _weights("target"), _weights("layer-skip"), _prompts(2, 9), None, jax.random.key(0)
        return count_jaxpr_eqns(jax.make_jaxpr(fn)(*args).jaxpr)

    assert n_eqns(8) == n_eqns(300)


def test_bad_requests_are_refused():
    prompt, params = _prompts(1, 8), _weights("target")

    @dataclasses.dataclass(frozen=True)
    class NoVerify:
        def prefill(self, params, tokens, lengths=None):
            return MODEL.prefill(params, tokens, lengths)

        def decode(self, params, token, cache):
            return MODEL.decode(params, token, cache)

    with pytest.raises(TypeError, match="lacks verify, commit"):
        ssdkit.generate(NoVerify(), params, prompt, max_new_tokens=4, speculative=Speculative())
    with pytest.raises(TypeError, match="draft model .* lacks verify, commit"):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4, speculative=Speculative(DraftModel(NoVerify())),
                        draft_params=params)
    with pytest.raises(ValueError, match="needs its parameters"):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4, speculative=Speculative(DraftModel(DRAFT)))
    with pytest.raises(ValueError, match="only for a source with a model"):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4, speculative=Speculative(), draft_params=params)
    with pytest.raises(ValueError, match="pass speculative="):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4, draft_params=params)
    with pytest.raises(TypeError, match="sampler's distribution"):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4, sampler=lambda logits, key: jnp.argmax(logits, -1),
                        key=jax.random.key(0), speculative=Speculative(adaptive=False))
    other = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=40, d_state=8, headdim=16, chunk_size=8)
    with pytest.raises(ValueError, match="the target's vocabulary"):
        ssdkit.generate(MODEL, params, prompt, max_new_tokens=4,
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


# ------------------------------------------------------------------------------ round costs
def test_measure_round_costs_is_an_explicit_tool():
    """On the one-layer model (the tool is the same for any target; a smaller program compiles sooner)."""
    spec = Speculative(draft_tokens=4)
    costs = measure_round_costs(DRAFT, _weights("layer-skip"), _prompts(1, 8), spec, rounds=2, repeats=1)
    assert len(costs) == len(spec.draft_lengths) == 4 and costs[0] == 1.0 and all(c > 0 for c in costs)
    Speculative(draft_tokens=4, round_costs=costs)  # a valid setting


@pytest.mark.parametrize("draft", [PromptLookup(), DraftModel(DRAFT)], ids=["lookup", "draft-model"])
def test_estimated_round_costs_are_deterministic_and_grow_with_k(draft):
    """The default costs come from the programs' shapes (XLA's cost analysis of the lowered programs):
    the same on every call, 1 for a plain round, and dearer for more drafts."""
    spec = Speculative(draft, draft_tokens=4)
    prompt = _prompts(2, 9)
    draft_params = None if isinstance(draft, PromptLookup) else _weights("layer-skip")

    def estimate():  # as the loop does, while it is traced: only shapes are read (nothing is compiled)
        costs = []

        def traced(params, prompt, draft_params):
            _, cache = MODEL.prefill(params, prompt)
            state = draft.start(draft_params, prompt, None, prompt[:, -1], 8, 4, CFG.padded_vocab_size)
            costs.append(estimate_round_costs(MODEL, params, draft_params, cache, state, spec, Greedy(), 2))

        jax.eval_shape(traced, _weights("target"), prompt, draft_params)
        return costs[0]

    costs = estimate()
    assert costs == estimate()
    assert costs[0] == 1.0 and all(a < b for a, b in zip(costs, costs[1:], strict=False)), costs


# Last in the module: it clears JAX's in-memory caches (later tests would trace and load their programs again).
def test_adaptive_sampling_is_a_pure_function_of_its_inputs(monkeypatch):
    """Adaptive drafting with estimated costs under sampling: two calls with the same key give the same
    tokens, though every clock and the measuring tool answer differently in each (and the second call
    traces and estimates afresh): nothing timing-dependent reaches the draft lengths."""
    import time

    import ssdkit.inference.costs as costs_module

    spec = Speculative(DraftModel(DRAFT), draft_tokens=4)
    prompt = _prompts(2, 8, seed=3)
    runs = []
    for run in range(2):
        clock = iter(range(0, 10**9, 1 + 1000 * run))
        monkeypatch.setattr(time, "perf_counter", lambda clock=clock: float(next(clock)))
        monkeypatch.setattr(costs_module, "measure_round_costs", lambda *a, run=run, **k: (1.0, 9.0 * run, 2.0, 3.0))
        jax.clear_caches()
        res = ssdkit.generate(MODEL, _weights("target"), prompt, max_new_tokens=12, speculative=spec,
                              draft_params=_weights("layer-skip"),
                              sampler=Sample(1.0), key=jax.random.key(7))
        runs.append(res)
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_array_equal(runs[0].speculation.drafted, runs[1].speculation.drafted)

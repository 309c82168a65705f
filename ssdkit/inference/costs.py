"""What a speculative round costs, in plain decode steps: estimated (the default) or measured (explicit).

:func:`estimate_round_costs` is what ``ssdkit.generate`` uses when ``Speculative.round_costs`` is None: a
pure function of the models, the shapes and the backend, computed while the loop is traced, so the same
inputs and key give the same tokens on every machine and every run. Each program a round runs (the
target's ``decode``, or its ``verify`` of k + 1 tokens and ``commit``; the draft source's own work, from
``DraftSource.round_cost``) is lowered, not compiled, and XLA's cost analysis of it gives its bytes
accessed and FLOPs; a program's cost is ``bytes + flops / balance``, with ``balance`` the FLOPs per byte
at which the backend's arithmetic and memory take equal time (:data:`BALANCE`). A round of k drafts costs
its programs' sum over the plain round's.

:func:`measure_round_costs` times the rounds on this machine instead: closer to this machine, but the
chosen draft lengths (and so, under sampling, the tokens) then depend on its timing. Call it yourself and
pass the result as ``Speculative(round_costs=...)``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ssdkit.inference.drafts import Speculative, verify_cost
from ssdkit.inference.protocol import prepare_params
from ssdkit.inference.rounds import run_round
from ssdkit.inference.sampling import Greedy
from ssdkit.xla_options import inference_jit

#: FLOPs per byte at which a backend's arithmetic takes as long as its memory traffic (machine balance),
#: and the fixed cost of a round of drafts (its own kernels: the draft, the verify's scan, acceptance,
#: commit), in bytes of traffic. CPU: fitted on a 2-core AMD EPYC (AVX-512) to measure_round_costs's
#: figures (docs/benchmarks.md): 130M, a verify of 9 tokens about 2 decode steps (DRAM-bound); the shipped
#: model (15 MB of weights in L3), about 3 decode steps for a round of 1 to 8 drafts (kernel-bound).
#: GPU and TPU: the float32 balance of an H100 (67 TFLOP/s over 3.35 TB/s) and the bfloat16 one of a
#: v6e (918 TFLOP/s over 1.64 TB/s), with no fixed cost; not fitted to a measurement.
BALANCE = {"cpu": 1.5, "gpu": 20.0, "tpu": 560.0}
ROUND_OVERHEAD = {"cpu": 4.0e7, "gpu": 0.0, "tpu": 0.0}


def _abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def program_cost(fn: Callable, *args, balance: float) -> float:
    """``bytes + flops / balance`` of ``fn(*args)`` from XLA's cost analysis of its lowered (unoptimised)
    program; ``args`` may be arrays, tracers or ``jax.ShapeDtypeStruct``. Loops count their body once."""
    analysis = jax.jit(fn).lower(*_abstract(args)).cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0]
    return float(analysis.get("bytes accessed", 0.0)) + float(analysis.get("flops", 0.0)) / balance


def estimate_round_costs(model, params, draft_params, cache, source_state, speculative: Speculative, sampler,
                         batch: int) -> tuple[float, ...]:
    """The cost of a round of each of ``speculative.draft_lengths`` drafts, in plain rounds (the first is 1):
    the target's programs plus the draft source's (``DraftSource.round_costs``), each from XLA's cost
    analysis (module docstring), plus :data:`ROUND_OVERHEAD` for a round of drafts. ``cache`` /
    ``source_state``: the loop's (arrays or tracers: only their shapes are read). Rounded to 2 digits."""
    backend = jax.default_backend()
    cost = functools.partial(program_cost, balance=BALANCE.get(backend, BALANCE["cpu"]))
    lengths = speculative.draft_lengths
    plain = cost(model.decode, params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache)
    target = (plain, *verify_cost(model, params, cache, batch, cost)(tuple(k + 1 for k in lengths[1:])))
    overhead = ROUND_OVERHEAD.get(backend, 0.0)
    source = speculative.draft.round_costs(draft_params, source_state, sampler, lengths, cost)
    costs = [t + s + (overhead if k else 0.0) for k, t, s in zip(lengths, target, source, strict=True)]
    return tuple(max(round(c / costs[0], 2), 0.01) for c in costs)


def measure_round_costs(
    model, params, prompt, speculative: Speculative, *, sampler=Greedy(), draft_params=None, rounds: int = 32,
    repeats: int = 7,
) -> tuple[float, ...]:
    """Time a round of each of ``speculative.draft_lengths`` drafts on this machine, in plain decode steps.

    The code the loop runs, from the cache after ``prompt`` (batch as given): plain rounds in a while loop
    of their own (the source catching up whenever it is behind), and one program for the rounds with
    drafts (propose + verify + accept + commit + roll back) behind a ``lax.switch`` as in the loop, the
    kind chosen at run time. Each repeat times every kind in turn (``rounds`` rounds); a kind's cost is
    the median over repeats of its time per round divided by the plain round's of the same repeat, rounded
    to 2 digits. Nothing is kept: pass the result as ``Speculative(round_costs=...)``.
    """
    source = speculative.draft
    prompt = jnp.asarray(prompt, jnp.int32)
    batch = prompt.shape[0]
    params = jax.jit(functools.partial(prepare_params, model))(params)  # the layouts the loop decodes from
    draft_params = jax.jit(source.prepare)(draft_params)
    logits, cache = jax.jit(model.prefill)(params, prompt)
    big_k = speculative.draft_tokens
    last = prompt[:, -1]
    state = source.start(draft_params, prompt, None, last, big_k + 1, big_k, logits.shape[-1])
    candidates, count = source.candidates(state, jnp.full((batch,), prompt.shape[1], jnp.int32), big_k)
    keys = (None, None) if isinstance(sampler, Greedy) else tuple(jax.random.split(jax.random.key(0)))
    at = jnp.full((batch,), prompt.shape[1], jnp.int32)  # rewritten every round: the text stays the prompt's

    def one(k, carry):
        last, cache, state = carry
        r = run_round(k, model, source, params, draft_params, sampler, last, cache, state, candidates, count, keys,
                      at, big_k + 1)
        return r.emitted[:, 0], r.cache, r.source

    @inference_jit  # compiled as the loop is: the costs are of the programs it runs
    def plain(params, draft_params, cache, state):
        def body(_, carry):
            last, cache, state = one(0, carry)
            state = lax.cond(source.behind(state), lambda s: source.catch_up(s, draft_params, sampler, last)[0],
                             lambda s: s, state)
            return last, cache, state

        return lax.fori_loop(0, rounds, body, (last, cache, state))

    @inference_jit
    def drafting(choice, params, draft_params, cache, state):
        def body(_, carry):
            return lax.switch(choice - 1, [functools.partial(one, k) for k in speculative.draft_lengths[1:]], carry)

        return lax.fori_loop(0, rounds, body, (last, cache, state))

    def timed(choice):
        start = time.perf_counter()
        if choice == 0:
            jax.block_until_ready(plain(params, draft_params, cache, state))
        else:
            jax.block_until_ready(drafting(jnp.int32(choice), params, draft_params, cache, state))
        return (time.perf_counter() - start) / rounds

    kinds = range(len(speculative.draft_lengths))
    for choice in kinds:  # compile, warm up
        timed(choice)
    ratios = []  # each kind against the plain round timed next to it: drift hits both alike
    for _ in range(repeats):
        seconds = [timed(choice) for choice in kinds]
        ratios.append([t / seconds[0] for t in seconds])
    return tuple(max(round(float(np.median([r[i] for r in ratios])), 2), 0.01) for i in kinds)

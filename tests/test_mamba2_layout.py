"""Weight layouts: per layer by default, stacked on request; decode never copies weights or states per step.

The structural claims (XLA's CPU backend copies a layer's weights out of stacked arrays on every decode step;
per-layer weights are read in place; ``ssd_step`` updates each layer's state in place) are checked on the
compiled HLO, not by timing.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssdkit
from ssdkit.inference.loop import _generate, _stream_next
from ssdkit.inference.speculative import generate_speculative
from ssdkit.models import mamba2
from ssdkit.models.mamba2.model import _decode_step
from tests.helpers import assert_same_up_to_rounding, speculative_lookup_setup

# Two layers: a scan over stacked weights and an unrolled per-layer stack both still loop over layers.
CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=100, d_state=16, headdim=16, chunk_size=8)
BATCH = 3  # the decode programs' batch (every program compiled once: _programs)


def _weight_copies(hlo: str, cfg: mamba2.Mamba2Config) -> list[str]:
    """Instructions of a compiled program that materialise a projection matrix (one layer's or stacked).

    Parameters, tuple elements and bitcasts only name an existing buffer; anything else with a weight's
    shape (a copy, a slicing fusion) writes one: per decode step, a full read and write of the weights.
    """
    h, p, d = cfg.nheads, cfg.headdim, cfg.d_model
    # in_proj_heads as stored and in any other arrangement XLA might copy it to (a transpose, the 2-D matrix)
    mats = [(h, 2 * p, d), (d, h, 2 * p), (2 * p, h, d), (h, d, 2 * p), (h * 2 * p, d), (d, h * 2 * p),
            (d, cfg.d_inner), (cfg.d_inner, d)]
    shapes = {",".join(map(str, s)) for m in mats for s in (m, (cfg.n_layer, *m))}
    pattern = re.compile(r"=\s*f32\[(" + "|".join(map(re.escape, shapes)) + r")\][{ ]")
    keep = []
    for line in hlo.splitlines():
        if pattern.search(line) and not re.search(r"\b(parameter|get-tuple-element|bitcast|tuple)\(", line):
            keep.append(line.strip())
    return keep


def _state_copies(hlo: str, cfg: mamba2.Mamba2Config, batch: int) -> list[str]:
    """``copy`` instructions of a compiled program with a layer state's (batch, H, P, N) shape."""
    shape = f"f32[{batch},{cfg.nheads},{cfg.headdim},{cfg.d_state}]"
    return [line.strip() for line in hlo.splitlines() if re.search(re.escape(shape) + r"\S* copy\(", line)]


def _loop_bodies(hlo: str) -> str:
    """The text of a compiled program's while-loop bodies: what runs every step."""
    computations = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(%\S+) .*?^}", hlo)}
    return "\n".join(computations.get(name, "") for name in set(re.findall(r"body=(%[\w.\-]+)", hlo)))


def _decode_programs(params, cfg, batch: int = 1, model=None):
    """What runs every decode step in the three decode programs the API runs, as compiled HLO text:
    decode_step (one step a call: all of it), generate's loop bodies, generate_stream's step (which gets
    the params as generate_stream prepared them, once per stream)."""
    token, cache = jnp.zeros((batch,), jnp.int32), mamba2.init_cache(cfg, batch)
    model, greedy = model or mamba2.Mamba2LM(cfg), ssdkit.Greedy()
    step = _decode_step.lower(model.prepare(params), cfg, token, cache)
    gen = _generate.lower(model, params, jnp.zeros((batch, 5), jnp.int32), None, None, max_new_tokens=4,
                          sampler=greedy, eos_token_id=None, pad_token_id=0)
    prepared = model.prepare(params)
    per_layer_cache = model.prefill(prepared, jnp.zeros((batch, 5), jnp.int32))[1]
    stream = _stream_next.lower(model, prepared, token, jnp.zeros((batch,), bool), per_layer_cache, None,
                                jnp.int32(1), None, sampler=greedy, eos_token_id=None, pad_token_id=0)
    return {"decode_step": step.compile().as_text(), "generate": _loop_bodies(gen.compile().as_text()),
            "generate_stream": stream.compile().as_text()}


@dataclasses.dataclass(frozen=True)
class _Unprepared(mamba2.Mamba2LM):
    """Mamba-2 without its decode layout: the loops run whatever layout they are given."""

    def prepare(self, params):
        return params


@functools.cache
def _programs(stacked: bool, batch: int = BATCH, unprepared: bool = False) -> dict[str, str]:
    """:func:`_decode_programs` of ``init_params(CFG, key(0))`` in a layout, compiled once for the module."""
    params = mamba2.init_params(CFG, jax.random.key(0), stacked=stacked)
    return _decode_programs(params, CFG, batch, model=_Unprepared(CFG) if unprepared else None)


def test_init_and_load_default_to_per_layer_and_stacked_holds_the_same_values(tmp_path):
    params = mamba2.init_params(CFG, jax.random.key(0))
    assert isinstance(params.layers, tuple) and len(params.layers) == CFG.n_layer
    stacked = mamba2.init_params(CFG, jax.random.key(0), stacked=True)
    assert isinstance(stacked.layers, mamba2.Mamba2LayerParams)
    # Pure data movement: the same random draws, laid out differently.
    jax.tree_util.tree_map(np.testing.assert_array_equal, mamba2.stack_layers(params), stacked)

    mamba2.save_checkpoint(params, CFG, tmp_path / "ck")
    loaded, _ = mamba2.load_checkpoint(tmp_path / "ck")
    assert isinstance(loaded.layers, tuple)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
    loaded_stacked, _ = mamba2.load_checkpoint(tmp_path / "ck", stacked=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_stacked, stacked)


@pytest.mark.compiled
@pytest.mark.parametrize("stacked", [False, True], ids=["init-default", "stacked-input"])
def test_api_decode_programs_read_weights_in_place(stacked):
    """Whatever layout the user passes to generate / generate_stream, what runs every decode step holds no
    weight copy: stacked params are split once per call (``Mamba2LM.prepare``), before the loop."""
    for name, hlo in _programs(stacked).items():
        assert _weight_copies(hlo, CFG) == [], name


# Batch 1 as well: -m long (the same programs at another batch; batch > 1 is the stricter case, where no
# size-1 axis lets XLA turn a reshape into a bitcast).
@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.long), BATCH])
@pytest.mark.compiled
def test_api_decode_programs_update_states_in_place(batch):
    """No program decode runs copies a layer's state: each step's update overwrites it in place. (When the
    update was computed in the readout's reshaped view, XLA gave it a fresh buffer and the generate loop
    copied every layer's state into its carry each step.)"""
    for name, hlo in _programs(False, batch).items():
        assert _state_copies(hlo, CFG, batch) == [], name


@pytest.mark.compiled
def test_stacked_layout_without_conversion_copies_weights_every_step():
    """Positive control for the HLO check above: the scan over stacked weights slices (copies) them."""
    programs = _programs(True, unprepared=True)
    for name in ("decode_step", "generate", "generate_stream"):
        assert len(_weight_copies(programs[name], CFG)) >= 2, name  # in_proj and out_proj each step


def test_stacked_params_are_split_inside_the_program():
    """``prepare`` is the identity on per-layer params and splits stacked ones where it is traced: the
    generation loops call it inside their compiled program, so no copy outlives a call."""
    per_layer = mamba2.init_params(CFG, jax.random.key(1))
    model = mamba2.Mamba2LM(CFG)
    assert model.prepare(per_layer) is per_layer
    stacked = mamba2.init_params(CFG, jax.random.key(1), stacked=True)
    traced = jax.eval_shape(lambda p: model.prepare(p).layers, stacked)
    assert isinstance(traced, tuple) and len(traced) == CFG.n_layer


@pytest.mark.numerics  # floats of two compiled programs: rerun with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (README)
def test_stacked_and_per_layer_agree():
    """A scan over stacked weights and the unrolled per-layer stack: the same math, two programs."""
    per_layer = mamba2.init_params(CFG, jax.random.key(3))
    stacked = mamba2.stack_layers(per_layer)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, 21)), jnp.int32)
    # Two compiled programs of the same math (measured bitwise equal here, under AVX-512, AVX2 and SSE4.2);
    # 64 ulps of the largest value leaves room for different FMA contraction through a 2-layer stack
    # (each layer a chain of a few dozen rounded ops), far below any real difference (O(1) relative).
    same = dict(ulps=64)
    assert_same_up_to_rounding(mamba2.forward(stacked, CFG, tokens), mamba2.forward(per_layer, CFG, tokens),
                               **same, name="forward")
    last_s, cache_s = mamba2.prefill(stacked, CFG, tokens)
    last_p, cache_p = mamba2.prefill(per_layer, CFG, tokens)
    assert_same_up_to_rounding(last_s, last_p, **same, name="prefill logits")
    assert_same_up_to_rounding(cache_s.state, cache_p.state, **same, name="prefill state")
    for got, want in zip(cache_s.conv, cache_p.conv, strict=True):  # x's window, B and C's
        assert_same_up_to_rounding(got, want, **same, name="prefill conv windows")
    step_s, _ = mamba2.model._decode_step(stacked, CFG, tokens[:, 0], cache_s)  # the stacked scan itself
    step_p, _ = mamba2.decode_step(per_layer, CFG, tokens[:, 0], cache_p)
    assert_same_up_to_rounding(step_s, step_p, **same, name="decode_step logits")


def test_generate_from_stacked_params_runs_the_per_layer_program():
    """The loop splits stacked params before it starts (data movement): both layouts decode the same tokens."""
    per_layer = mamba2.init_params(CFG, jax.random.key(4))
    stacked = mamba2.init_params(CFG, jax.random.key(4), stacked=True)
    # the programs of _decode_programs' generate (its prompt shape and max_new_tokens): no new compile
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (BATCH, 5)), jnp.int32)
    a = mamba2.generate(per_layer, CFG, prompt, max_new_tokens=4)
    b = mamba2.generate(stacked, CFG, prompt, max_new_tokens=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)


@pytest.mark.compiled
def test_speculative_plain_rounds_update_states_in_place():
    """The speculative loop runs its plain rounds in a while loop of their own: a loop body that holds the
    LM head's product (a decode step; itself or in one of the body's fusions) and copies no layer state.
    (Behind the rounds' ``lax.switch`` XLA copied every layer's state each plain round, and no loop body
    held a decode step: checked on the old loop.) Prompt lookup: with a draft model, the draft's own
    k-step loop would satisfy this check too. The program is test_speculative_generation's prompt-lookup
    one (its model, settings and shapes), which the run's shared XLA cache then compiles once for both."""
    cfg, spec, run = speculative_lookup_setup()
    batch, prompt_len = run["batch"], run["prompt_len"]
    params = mamba2.init_params(cfg, jax.random.key(0))
    hlo = generate_speculative.lower(
        mamba2.Mamba2LM(cfg), params, None, jnp.zeros((batch, prompt_len), jnp.int32),
        jnp.full((batch,), prompt_len, jnp.int32), None, max_new_tokens=run["max_new_tokens"],
        sampler=ssdkit.Greedy(), eos_token_id=run["eos_token_id"], pad_token_id=0, speculative=spec,
    ).compile().as_text()
    computations = {m.group(1): m.group(0) for m in re.finditer(r"(?ms)^(%\S+) .*?^}", hlo)}

    def fused(name: str) -> set[str]:
        """``name`` and the computations its instructions fuse or call (``calls=``), not its branches or loops."""
        seen, todo = set(), [name]
        while todo:
            if (n := todo.pop()) not in seen:
                seen.add(n)
                todo += re.findall(r"calls=(%[\w.\-]+)", computations.get(n, ""))
        return seen

    head = re.escape(f"f32[{batch},{cfg.padded_vocab_size}]") + r"\S* dot\("
    plain_bodies = [name for name in set(re.findall(r"body=(%[\w.\-]+)", hlo))
                    if any(re.search(head, computations.get(c, "")) for c in fused(name))]
    assert plain_bodies, "no while loop runs a decode step directly (in its body or a fusion of it)"
    for name in plain_bodies:
        assert _state_copies(computations[name], cfg, batch) == [], name

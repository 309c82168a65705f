"""Mamba-2 model paths against each other: forward, prefill, decode, padding, precision.

Float64 comparisons use 1e-9 relative to the largest |expected| entry (the paths sum the same terms in
a different order); float32 comparisons of two float32 paths use 1e-4 (several layers of ~1e-6
rounding each, amplified by the norms). Greedy tokens from two paths are compared with
``assert_same_greedy_tokens``: equal up to a near tie, a top-2 logit gap below twice that 1e-4.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdkit.dtypes import sequence_matmul_dtype
from ssdkit.models import mamba2
from tests.helpers import assert_close, assert_same_greedy_tokens, greedy_margins

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)
CFG_GROUPS = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=4,
                                 ngroups=2)


def _params(cfg, dtype=jnp.float32, seed=0):
    params = mamba2.init_params(cfg, jax.random.key(seed), dtype, stacked=True)
    # Larger embeddings and non-unit norms make every term of the layer matter in comparisons.
    k1, k2 = jax.random.split(jax.random.key(seed + 100))
    layers = dataclasses.replace(
        params.layers,
        gate_norm=(1 + 0.3 * jax.random.normal(k1, params.layers.gate_norm.shape)).astype(dtype),
        D=1 + 0.3 * jax.random.normal(k2, params.layers.D.shape),
    )
    # the default (per-layer) layout, as init_params and load_checkpoint return it
    return mamba2.unstack_layers(dataclasses.replace(params, embedding=params.embedding * 30, layers=layers))


def _tokens(cfg, batch, seq, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)), jnp.int32)


def _decode_all(params, cfg, tokens):
    """Logits at every position by stepping the O(1) decode from an empty cache (sequential path)."""
    cache = mamba2.init_cache(cfg, tokens.shape[0], mamba2.model.compute_dtype(params))
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = mamba2.decode_step(params, cfg, tokens[:, t], cache)
        out.append(logits)
    return jnp.stack(out, axis=1), cache


@pytest.mark.parametrize("cfg", [CFG, CFG_GROUPS], ids=["g1", "g2"])
def test_forward_equals_sequential_decode_float64(cfg):
    """The chunked path against the step-by-step path in float64 (also the ngroups > 1 oracle)."""
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _params(cfg))
        tokens = _tokens(cfg, 2, 19)
        logits = mamba2.forward(params, cfg, tokens)
        stepped, _ = _decode_all(params, cfg, tokens)
        assert_close(logits, stepped, rtol=1e-9, name="logits")


def test_prefill_then_decode_equals_forward():
    params = _params(CFG)
    tokens = _tokens(CFG, 2, 30)
    full = mamba2.forward(params, CFG, tokens)
    last, cache = mamba2.prefill(params, CFG, tokens[:, :17])
    assert_close(last, full[:, 16], rtol=1e-4, name="prefill logits")
    for t in range(17, 30):
        logits, cache = mamba2.decode_step(params, CFG, tokens[:, t], cache)
        assert_close(logits, full[:, t], rtol=1e-4, name=f"decode logits at {t}")
    assert cache.state.dtype == jnp.float32


def test_chunked_prefill_equals_one_shot():
    params = _params(CFG)
    tokens = _tokens(CFG, 2, 37)
    last, cache = mamba2.prefill(params, CFG, tokens)
    _, c1 = mamba2.prefill(params, CFG, tokens[:, :11])
    _, c2 = mamba2.prefill(params, CFG, tokens[:, 11:13], cache=c1)
    last2, c3 = mamba2.prefill(params, CFG, tokens[:, 13:], cache=c2)
    assert_close(last2, last, rtol=1e-4, name="logits")
    assert_close(c3.state, cache.state, rtol=1e-4, name="state")
    for got, want in zip(c3.conv, cache.conv, strict=True):  # x's window, B and C's
        assert_close(got, want, rtol=1e-6, name="conv window")


def test_right_padding_is_exact():
    """A padded batch equals each row run alone: logits, state, conv window and what follows."""
    params = _params(CFG)
    lengths = [13, 3, 9]
    rows = [_tokens(CFG, 1, n, seed=i) for i, n in enumerate(lengths)]
    padded = jnp.concatenate([jnp.pad(r, ((0, 0), (0, 13 - r.shape[1])), constant_values=7) for r in rows])
    last, cache = mamba2.prefill(params, CFG, padded, lengths=jnp.asarray(lengths, jnp.int32))
    nxt = _tokens(CFG, 3, 1, seed=9)[:, 0]
    # decode_step donates its cache: step a copy, keep the original for the checks below.
    step_logits, _ = mamba2.decode_step(params, CFG, nxt, jax.tree_util.tree_map(jnp.copy, cache))
    for i, row in enumerate(rows):
        ref_last, ref_cache = mamba2.prefill(params, CFG, row)
        assert_close(last[i], ref_last[0], rtol=1e-5, name=f"row {i} logits")
        assert_close(cache.state[:, i], ref_cache.state[:, 0], rtol=1e-5, name=f"row {i} state")
        for got, want in zip(cache.conv, ref_cache.conv, strict=True):
            assert_close(got[:, i], want[:, 0], rtol=1e-6, name=f"row {i} conv")
        ref_step, _ = mamba2.decode_step(params, CFG, nxt[i:i + 1], ref_cache)
        assert_close(step_logits[i], ref_step[0], rtol=1e-5, name=f"row {i} next logits")


def _greedy_margins(params, cfg, prompt, tokens, lengths=None):
    """Top-1 minus top-2 logit behind each greedy token of ``tokens`` (batch, new) continuing ``prompt``,
    from prefill and decode_step fed those very tokens; and the near-tie bound, twice the 1e-4 relative
    rounding of two float32 paths (module doc)."""
    logits, cache = mamba2.prefill(params, cfg, prompt, lengths=lengths)
    steps = [logits]
    for t in range(tokens.shape[1] - 1):
        logits, cache = mamba2.decode_step(params, cfg, jnp.asarray(tokens[:, t]), cache)
        steps.append(logits)
    steps = np.stack(steps, axis=1)
    return greedy_margins(steps), 2 * 1e-4 * float(np.abs(steps).max())


def test_generate_with_lengths_and_stream():
    params = _params(CFG)
    prompt = _tokens(CFG, 2, 9)
    lengths = jnp.asarray([9, 4], jnp.int32)
    res = mamba2.generate(params, CFG, prompt, max_new_tokens=12, lengths=lengths)
    margins, tie = _greedy_margins(params, CFG, prompt, res.tokens, lengths)
    alone = mamba2.generate(params, CFG, prompt[1:, :4], max_new_tokens=12)
    assert_same_greedy_tokens(alone.tokens, res.tokens[1:], margins[1:], tie=tie, name="row alone vs padded")
    streamed = np.stack([np.asarray(t) for t in mamba2.generate_stream(
        params, CFG, prompt, max_new_tokens=12, lengths=lengths)], axis=1)
    assert_same_greedy_tokens(streamed, res.tokens, margins, tie=tie, name="stream vs generate")
    sampled = mamba2.generate(params, CFG, prompt, max_new_tokens=12, temperature=0.8, top_k=5, top_p=0.9,
                              key=jax.random.key(3))
    assert sampled.tokens.shape == (2, 12) and sampled.tokens.dtype == jnp.int32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_weights(dtype):
    params32 = _params(CFG)
    params = mamba2.cast_params(params32, dtype)
    assert all(lp.A_log.dtype == jnp.float32 and lp.in_proj_heads.dtype == dtype for lp in params.layers)
    tokens = _tokens(CFG, 1, 20)
    ref = mamba2.forward(params32, CFG, tokens)
    logits = mamba2.forward(params, CFG, tokens)
    assert logits.dtype == jnp.float32
    # Half-precision activations (8 or 11 significant bits) through 2 layers: a few percent.
    assert_close(logits, ref, rtol=0.1, name="logits")
    _, cache = mamba2.prefill(params, CFG, tokens)
    assert cache.state.dtype == jnp.float32 and all(w.dtype == dtype for w in cache.conv)


def test_sequence_matmul_dtype_policy():
    """Half-precision weights multiply a whole sequence in float32 on CPU only; one token never upcasts."""
    for half in (jnp.bfloat16, jnp.float16):
        assert sequence_matmul_dtype(half, "cpu") == jnp.float32
        assert sequence_matmul_dtype(half, "gpu") == half and sequence_matmul_dtype(half, "tpu") == half
    assert sequence_matmul_dtype(jnp.float32, "cpu") == jnp.float32
    assert sequence_matmul_dtype(jnp.float64, "cpu") == jnp.float64

    params = mamba2.cast_params(_params(CFG), jnp.bfloat16)
    tokens = _tokens(CFG, 1, 8)

    def in_proj_dots(fn, *args):  # the dtype in_proj's weight has where a dot_general reads it
        text = jax.jit(fn).lower(*args).as_text()
        weight = f"tensor<{CFG.nheads * 2 * CFG.headdim}x{CFG.d_model}x"  # in_proj_heads, as the 2-D matrix
        return {line.split(weight)[1].split(">")[0] for line in text.splitlines()
                if "dot_general" in line and weight in line}

    want = sequence_matmul_dtype(jnp.bfloat16)
    assert in_proj_dots(lambda p, t: mamba2.model.prefill_program(p, CFG, t, None, None), params, tokens) == {
        {jnp.dtype(jnp.float32): "f32", jnp.dtype(jnp.bfloat16): "bf16"}[want]}
    cache = mamba2.init_cache(CFG, 1, jnp.bfloat16)
    assert in_proj_dots(lambda p, t, c: mamba2.model._decode(p, CFG, t, c), params, tokens[:, 0], cache) == {"bf16"}


def test_init_params_traceable_at_full_scale():
    cfg = mamba2.Mamba2Config.preset("2.7b")
    shapes = jax.eval_shape(lambda k: mamba2.init_params(cfg, k), jax.random.key(0))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert n == cfg.num_params()
    assert len(shapes.layers) == 64
    assert shapes.layers[0].in_proj_heads.shape == (80, 128, 2560)  # 80 heads: z, x (64 rows each)
    assert shapes.layers[0].in_proj_dt.shape == (80, 2560)
    assert shapes.layers[0].in_proj_groups.shape == (1, 256, 2560)  # 1 group: B, C (128 rows each)
    assert shapes.layers[-1].conv_x_weight.shape == (4, 5120) and shapes.layers[-1].conv_bc_weight.shape == (4, 256)


def _flops(fn, *args):
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis["flops"])


def test_decode_step_cost_independent_of_chunk_and_length():
    """XLA cost analysis: a decode step's FLOPs do not depend on chunk size or tokens seen."""
    flops = []
    for chunk in (4, 8, 32):
        cfg = dataclasses.replace(CFG, chunk_size=chunk)
        params = _params(cfg)
        for seq in (5, 40):
            _, cache = mamba2.prefill(params, cfg, _tokens(cfg, 1, seq))
            flops.append(_flops(lambda p, t, c, cfg=cfg: mamba2.model._decode(p, cfg, t, c), params,
                                jnp.zeros((1,), jnp.int32), cache))
    assert len(set(flops)) == 1, flops
    prefill_flops = _flops(lambda p, t: mamba2.forward(p, CFG, t), _params(CFG), _tokens(CFG, 1, 64))
    assert flops[0] * 16 < prefill_flops, (flops[0], prefill_flops)


def test_bad_inputs():
    params = _params(CFG)
    with pytest.raises(ValueError, match="token id 64 in tokens is out of range"):
        mamba2.forward(params, CFG, jnp.asarray([[1, 64]], jnp.int32))
    with pytest.raises(ValueError, match="token id -1"):
        mamba2.prefill(params, CFG, jnp.asarray([[1, -1]], jnp.int32))
    with pytest.raises(TypeError, match="tokens must be an integer array"):
        mamba2.forward(params, CFG, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, seq\)"):
        mamba2.forward(params, CFG, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="lengths must lie in 1..4"):
        mamba2.prefill(params, CFG, jnp.zeros((2, 4), jnp.int32), lengths=jnp.asarray([4, 5], jnp.int32))
    cache = mamba2.init_cache(CFG, 2)
    with pytest.raises(ValueError, match="cache does not fit"):
        mamba2.decode_step(params, CFG, jnp.zeros((3,), jnp.int32), cache)
    with pytest.raises(ValueError, match=r"token must have shape \(batch,\)"):
        mamba2.decode_step(params, CFG, jnp.zeros((2, 1), jnp.int32), cache)


def test_verify_then_commit_equals_prefill_of_the_accepted_tokens():
    """verify: the logits decode_step gives the k tokens one by one; commit(j): the cache prefill gives after
    the first j of them, for every j in 0..k and for a different j per row."""
    params = _params(CFG)
    prompt, drafts = _tokens(CFG, 3, 7), _tokens(CFG, 3, 5, seed=4)
    _, cache = mamba2.prefill(params, CFG, prompt)
    logits, record = mamba2.verify(params, CFG, drafts, cache)
    full = mamba2.forward(params, CFG, jnp.concatenate([prompt, drafts], axis=1))
    assert_close(logits, full[:, 7:], rtol=1e-4, name="verified logits")
    k = drafts.shape[1]
    for accepted in ([0, 0, 0], [1, 1, 1], [k, k, k], [0, 3, k], [2, k, 1]):
        got = mamba2.commit(record, jnp.asarray(accepted, jnp.int32))
        for i, j in enumerate(accepted):
            _, want = mamba2.prefill(params, CFG, jnp.concatenate([prompt[i:i + 1], drafts[i:i + 1, :j]], axis=1))
            assert_close(got.state[:, i], want.state[:, 0], rtol=1e-4, name=f"row {i} state after {j}")
            for g, w in zip(got.conv, want.conv, strict=True):
                assert_close(g[:, i], w[:, 0], rtol=1e-6, name=f"row {i} conv window after {j}")
    # the committed cache continues like the reference
    got = mamba2.commit(record, jnp.asarray([0, 3, k], jnp.int32))
    nxt = _tokens(CFG, 3, 1, seed=8)[:, 0]
    step, _ = mamba2.decode_step(params, CFG, nxt, got)
    for i, j in enumerate([0, 3, k]):
        seq = jnp.concatenate([prompt[i:i + 1], drafts[i:i + 1, :j], nxt[i:i + 1, None]], axis=1)
        assert_close(step[i], mamba2.forward(params, CFG, seq)[0, -1], rtol=1e-4, name=f"row {i} next logits")
    with pytest.raises(ValueError, match=r"accepted must lie in 0..5"):
        mamba2.commit(record, jnp.asarray([0, 6, 1], jnp.int32))

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
from ssdkit.matmul_probe import ENV_VAR, MatmulProbe, ProbeKey, use_probe
from ssdkit.models import mamba2
from tests.helpers import assert_close, assert_same_greedy_tokens, greedy_margins

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)
CFG_GROUPS = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=4,
                                 ngroups=2)


#: fake probe results: this CPU's bfloat16 GEMM at 0.5x and 2x float32's rate
SLOWER, FASTER = (MatmulProbe(ProbeKey("Test CPU", (), "0", "0", ""), 100.0, r, 0.5) for r in (50.0, 200.0))


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
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)


# Compilation is most of this module's cost: the float32 tests share one set of weights and one batch shape,
# (3, SEQ) = 3 rows of 2 chunks and a ragged tail, so that forward, prefill (of the whole rows with lengths,
# of the prefixes :11, and of pieces of 4 continuing a cache) and decode_step (batch 3) compile once for all
# of them. Host (numpy) arrays are sliced on the host: slicing a jax array compiles a program per index.
SEQ = 19
TOKENS = _tokens(CFG, 3, SEQ)
PREFIX = 11  # a prefix of one chunk and a ragged part
FULL = np.full(3, SEQ, np.int32)  # every row's tokens all real: prefill with lengths equal to one without


@pytest.fixture(scope="module")
def params():
    return _params(CFG)


def _copy(cache):
    """decode_step donates its cache: step a copy where the original is still needed."""
    return jax.tree_util.tree_map(jnp.copy, cache)


def _host(tree):
    """numpy copies, to index on the host (indexing a jax array compiles a program per index)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def _decode_all(params, cfg, tokens):
    """Logits at every position by stepping the O(1) decode from an empty cache (sequential path)."""
    cache = mamba2.init_cache(cfg, tokens.shape[0], mamba2.model.compute_dtype(params))
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = mamba2.decode_step(params, cfg, tokens[:, t], cache)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1), cache


# g2 (two groups) is a long case: by default groups > 1 are compared with torch (test_mamba2_parity's
# "groups" config, every position's logits and hidden states) and in the scan (test_scan).
@pytest.mark.parametrize("cfg", [CFG, pytest.param(CFG_GROUPS, marks=pytest.mark.long)], ids=["g1", "g2"])
def test_forward_equals_sequential_decode_float64(cfg):
    """The chunked path against the step-by-step path in float64 (also the ngroups > 1 oracle)."""
    params = _params(cfg)  # drawn outside x64: the eager ops of the draw compile once, not again for x64
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        tokens = _tokens(cfg, 2, 19)
        logits = mamba2.forward(params, cfg, tokens)
        stepped, _ = _decode_all(params, cfg, tokens)
        assert_close(logits, stepped, rtol=1e-9, name="logits")


def test_prefill_then_decode_equals_forward(params):
    full = np.asarray(mamba2.forward(params, CFG, TOKENS))
    last, cache = mamba2.prefill(params, CFG, TOKENS[:, :PREFIX])
    assert_close(last, full[:, PREFIX - 1], rtol=1e-4, name="prefill logits")
    for t in range(PREFIX, SEQ):
        logits, cache = mamba2.decode_step(params, CFG, TOKENS[:, t], cache)
        assert_close(logits, full[:, t], rtol=1e-4, name=f"decode logits at {t}")
    assert cache.state.dtype == jnp.float32


def test_chunked_prefill_equals_one_shot(params):
    """Pieces of 11 (a chunk and a ragged part), 4 and 4 (shorter than a chunk), each continuing the cache."""
    last, cache = mamba2.prefill(params, CFG, TOKENS, lengths=FULL)
    _, c1 = mamba2.prefill(params, CFG, TOKENS[:, :PREFIX])
    _, c2 = mamba2.prefill(params, CFG, TOKENS[:, PREFIX:PREFIX + 4], cache=c1)
    last2, c3 = mamba2.prefill(params, CFG, TOKENS[:, PREFIX + 4:], cache=c2)
    assert_close(last2, last, rtol=1e-4, name="logits")
    assert_close(c3.state, cache.state, rtol=1e-4, name="state")
    for got, want in zip(c3.conv, cache.conv, strict=True):  # x's window, B and C's
        assert_close(got, want, rtol=1e-6, name="conv window")


# Right padding: the rows' lengths (the whole row, one shorter than a chunk, one over a chunk boundary) and
# the padded batch, pad id 7 after each row's end.
LENGTHS = np.asarray([SEQ, 4, PREFIX], np.int32)
PADDED = np.where(np.arange(SEQ) < LENGTHS[:, None], TOKENS, 7).astype(np.int32)


def _alone(params, row):
    """(last logits, cache) of PADDED's row ``row`` run alone: its real tokens without padding, from an empty
    cache (in a batch of rows of its length, which are independent: the programs the other tests run)."""
    n = int(LENGTHS[row])
    if n == 4:  # a piece of 4 continuing the empty cache
        return mamba2.prefill(params, CFG, PADDED[:, :n], cache=mamba2.init_cache(CFG, 3))
    if n == SEQ:  # row 0 has no padding: the batch with every row's full length
        return mamba2.prefill(params, CFG, PADDED, lengths=FULL)
    return mamba2.prefill(params, CFG, PADDED[:, :n])


def test_right_padding_is_exact(params):
    """A padded batch equals each row run alone: logits, state, conv window and what follows."""
    last, cache = mamba2.prefill(params, CFG, PADDED, lengths=LENGTHS)
    nxt = _tokens(CFG, 3, 1, seed=9)[:, 0]
    step_logits, _ = mamba2.decode_step(params, CFG, nxt, _copy(cache))
    last, cache, step_logits = _host((last, cache, step_logits))
    for i in range(3):
        ref_last, ref_cache = _alone(params, i)
        ref_step, _ = mamba2.decode_step(params, CFG, nxt, _copy(ref_cache))
        ref_last, ref_cache, ref_step = _host((ref_last, ref_cache, ref_step))
        assert_close(last[i], ref_last[i], rtol=1e-5, name=f"row {i} logits")
        assert_close(cache.state[:, i], ref_cache.state[:, i], rtol=1e-5, name=f"row {i} state")
        for got, want in zip(cache.conv, ref_cache.conv, strict=True):
            assert_close(got[:, i], want[:, i], rtol=1e-6, name=f"row {i} conv")
        assert_close(step_logits[i], ref_step[i], rtol=1e-5, name=f"row {i} next logits")


def _greedy_margins(params, cfg, prompt, tokens, lengths=None):
    """Top-1 minus top-2 logit behind each greedy token of ``tokens`` (batch, new) continuing ``prompt``,
    from prefill and decode_step fed those very tokens; and the near-tie bound, twice the 1e-4 relative
    rounding of two float32 paths (module doc)."""
    logits, cache = mamba2.prefill(params, cfg, prompt, lengths=lengths)
    steps = [np.asarray(logits)]
    tokens = np.asarray(tokens)
    for t in range(tokens.shape[1] - 1):
        logits, cache = mamba2.decode_step(params, cfg, tokens[:, t], cache)
        steps.append(np.asarray(logits))
    steps = np.stack(steps, axis=1)
    return greedy_margins(steps), 2 * 1e-4 * float(np.abs(steps).max())


def _greedy_alone(params, new):
    """Each row of PADDED alone, decoded greedily for ``new`` tokens by a Python loop of decode_step:
    (tokens (3, new), margins, tie) as in :func:`_greedy_margins`."""
    caches = [_alone(params, i) for i in range(3)]
    logits = np.stack([np.asarray(last)[i] for i, (last, _) in enumerate(caches)])
    # each row's cache, gathered into one batch
    cache = jax.tree_util.tree_map(lambda *rows: np.stack([np.asarray(r)[:, i] for i, r in enumerate(rows)], 1),
                                   *(c for _, c in caches))
    steps, tokens = [logits], [logits.argmax(-1).astype(np.int32)]
    for _ in range(new - 1):
        logits, cache = mamba2.decode_step(params, CFG, tokens[-1], cache)
        steps.append(np.asarray(logits))
        tokens.append(steps[-1].argmax(-1).astype(np.int32))
    steps = np.stack(steps, axis=1)
    return np.stack(tokens, axis=1), greedy_margins(steps), 2 * 1e-4 * float(np.abs(steps).max())


def test_generate_with_lengths_and_stream(params):
    """Token ids compared with the margin-aware helper: no float comparison that rounding could flip.

    The reference for "each row alone" is a Python loop of prefill and decode_step per row without padding
    (test_generate.py checks the generation loop itself against such a loop)."""
    res = mamba2.generate(params, CFG, PADDED, max_new_tokens=12, lengths=LENGTHS)
    alone, alone_margins, alone_tie = _greedy_alone(params, 12)
    assert_same_greedy_tokens(res.tokens, alone, alone_margins, tie=alone_tie, name="padded vs rows alone")
    margins, tie = _greedy_margins(params, CFG, PADDED, res.tokens, LENGTHS)
    streamed = np.stack([np.asarray(t) for t in mamba2.generate_stream(
        params, CFG, PADDED, max_new_tokens=12, lengths=LENGTHS)], axis=1)
    assert_same_greedy_tokens(streamed, res.tokens, margins, tie=tie, name="stream vs generate")
    # Sampling (temperature, top-k, top-p, key) is run and checked against a Python loop in test_generate.py;
    # here the wrapper's arguments reach it: the traced program's result (its compile costs 5 CPU-s).
    sampled = jax.eval_shape(lambda: mamba2.generate(params, CFG, PADDED, max_new_tokens=12, temperature=0.8,
                                                     top_k=5, top_p=0.9, key=jax.random.key(3)))
    assert sampled.tokens.shape == (3, 12) and sampled.tokens.dtype == jnp.int32


# float16 goes through the same casts as bfloat16 (another parametrization): long.
@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=pytest.mark.long)])
def test_half_precision_weights(params, dtype):
    half = mamba2.cast_params(params, dtype)
    assert all(lp.A_log.dtype == jnp.float32 and lp.in_proj_heads.dtype == dtype for lp in half.layers)
    ref = mamba2.forward(params, CFG, TOKENS)
    logits = mamba2.forward(half, CFG, TOKENS)
    assert logits.dtype == jnp.float32
    # Half-precision activations (8 or 11 significant bits) through 2 layers: a few percent.
    assert_close(logits, ref, rtol=0.1, name="logits")
    # The cache's dtypes are fixed when prefill is traced: read them without compiling it.
    _, cache = jax.eval_shape(lambda p: mamba2.prefill(p, CFG, TOKENS), half)
    assert cache.state.dtype == jnp.float32 and all(w.dtype == dtype for w in cache.conv)


def _dots_reading(text: str, shape: str) -> list[str]:
    """The operand types of every dot_general in the lowered ``text`` that reads a ``shape`` tensor (e.g.
    ``"96x32"``), such as ``"tensor<3x19x32xbf16>, tensor<96x32xbf16>"``."""
    return [line.split(": (")[-1].split(") ->")[0] for line in text.splitlines()
            if "dot_general" in line and f"tensor<{shape}x" in line]


def test_sequence_matmul_dtype_policy(monkeypatch):
    """Half-precision weights multiply a whole sequence in their own dtype where that is faster (GPU, TPU; a
    CPU whose probe says so) and in float32 elsewhere; one token never upcasts. The probe's rules in detail:
    tests/test_matmul_probe.py."""
    monkeypatch.delenv(ENV_VAR)  # tests/conftest.py pins float32
    for fake, want in ((SLOWER, jnp.float32), (FASTER, jnp.bfloat16)):
        with use_probe(fake):
            assert sequence_matmul_dtype(jnp.bfloat16, "cpu") == want
            assert sequence_matmul_dtype(jnp.float16, "cpu") == jnp.float32  # not probed
            for half in (jnp.bfloat16, jnp.float16):
                assert sequence_matmul_dtype(half, "gpu") == half and sequence_matmul_dtype(half, "tpu") == half
            assert sequence_matmul_dtype(jnp.float32, "cpu") == jnp.float32
            assert sequence_matmul_dtype(jnp.float64, "cpu") == jnp.float64

    params = mamba2.cast_params(_params(CFG), jnp.bfloat16)
    weight = f"{CFG.nheads * 2 * CFG.headdim}x{CFG.d_model}"  # in_proj_heads, as the 2-D matrix

    def in_proj_dots(fn, *args):  # the dtype in_proj's weight has where a dot_general reads it
        return {operands.split(f"tensor<{weight}x")[1].split(">")[0]
                for operands in _dots_reading(jax.jit(fn).lower(*args).as_text(), weight)}

    # The choice is made when a program is traced, and jit keeps traces by argument shapes (prefill_program's
    # own too): each fake traces a prompt length of its own.
    for fake, want, seq in ((SLOWER, "f32", 8), (FASTER, "bf16", 9)):
        with use_probe(fake):
            assert in_proj_dots(lambda p, t: mamba2.model.prefill_program(p, CFG, t, None, None), params,
                                _tokens(CFG, 1, seq)) == {want}
    cache = mamba2.init_cache(CFG, 1, jnp.bfloat16)
    assert in_proj_dots(lambda p, t, c: mamba2.model._decode(p, CFG, t, c), params, _tokens(CFG, 1, 1)[:, 0],
                        cache) == {"bf16"}


def test_half_products_keep_the_gradient_in_half_precision(monkeypatch):
    """bfloat16 products (ssdkit.dtypes.sequence_einsum): the two products of each projection's gradient
    are bfloat16 too (JAX's own rule would multiply the float32 cotangent by the upcast weight, in float32),
    and remat="matmuls" saves their outputs as it saves float32 ones: the same number of products."""
    monkeypatch.setenv(ENV_VAR, "bfloat16")
    params = mamba2.cast_params(_params(CFG), jnp.bfloat16)
    weight = f"{CFG.nheads * 2 * CFG.headdim}x{CFG.d_model}"
    tokens = _tokens(CFG, 2, 8)

    def dots(p, remat):
        grad = jax.jit(jax.grad(lambda p, t: mamba2.loss(p, CFG, t, remat=remat)[0]))
        return _dots_reading(grad.lower(p, tokens).as_text(), weight)

    half = dots(params, "matmuls")
    assert half and all(d.count("bf16") == 2 for d in half), half
    assert len(half) == len(dots(_params(CFG), "matmuls"))  # float32 weights: plain products


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
    """XLA's cost analysis of the program ``fn`` lowers to (before XLA's optimisation passes: no compile)."""
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    return float(analysis["flops"])


def test_decode_step_cost_independent_of_chunk_and_length(params):
    """XLA cost analysis: a decode step's FLOPs do not depend on chunk size or tokens seen."""
    flops = []
    for chunk in (4, 8, 32):
        cfg = dataclasses.replace(CFG, chunk_size=chunk)
        for seq in (5, 40):
            # the cache prefill returns after seq tokens, as the decode program sees it (traced, not run)
            _, cache = jax.eval_shape(lambda p, cfg=cfg, seq=seq: mamba2.prefill(p, cfg, _tokens(cfg, 1, seq)),
                                      params)
            flops.append(_flops(lambda p, t, c, cfg=cfg: mamba2.model._decode(p, cfg, t, c), params,
                                jnp.zeros((1,), jnp.int32), cache))
    assert len(set(flops)) == 1, flops
    prefill_flops = _flops(lambda p, t: mamba2.forward(p, CFG, t), params, _tokens(CFG, 1, 64))
    assert flops[0] * 16 < prefill_flops, (flops[0], prefill_flops)


def test_bad_inputs(params):
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


def test_verify_then_commit_equals_prefill_of_the_accepted_tokens(params):
    """verify: the logits decode_step gives the k tokens one by one; commit(j): the cache prefill gives after
    the first j of them, for every j in 0..k and for a different j per row.

    References come from the padded (3, SEQ) batch (prompt, drafts, then padding): forward's logits at a
    position do not depend on later tokens, and prefill with ``lengths`` equals each row run alone
    (test_right_padding_is_exact)."""
    prompt, drafts = TOKENS[:, :PREFIX], _tokens(CFG, 3, 5, seed=4)
    k = drafts.shape[1]
    _, cache = mamba2.prefill(params, CFG, prompt)
    logits, record = mamba2.verify(params, CFG, drafts, cache)
    seq = np.concatenate([prompt, drafts, np.full((3, SEQ - PREFIX - k), 7, np.int32)], axis=1)
    full = np.asarray(mamba2.forward(params, CFG, seq))
    assert_close(logits, full[:, PREFIX:PREFIX + k], rtol=1e-4, name="verified logits")
    for accepted in ([0, 0, 0], [1, 1, 1], [k, k, k], [0, 3, k], [2, k, 1]):
        got = _host(mamba2.commit(record, jnp.asarray(accepted, jnp.int32)))
        _, want = _host(mamba2.prefill(params, CFG, seq, lengths=PREFIX + np.asarray(accepted, np.int32)))
        for i, j in enumerate(accepted):
            assert_close(got.state[:, i], want.state[:, i], rtol=1e-4, name=f"row {i} state after {j}")
            for g, w in zip(got.conv, want.conv, strict=True):
                assert_close(g[:, i], w[:, i], rtol=1e-6, name=f"row {i} conv window after {j}")
    # the committed cache continues like the reference
    accepted = [0, 3, k]
    got = mamba2.commit(record, jnp.asarray(accepted, jnp.int32))
    nxt = _tokens(CFG, 3, 1, seed=8)[:, 0]
    step = np.asarray(mamba2.decode_step(params, CFG, nxt, got)[0])
    following = np.full((3, SEQ), 7, np.int32)
    for i, j in enumerate(accepted):
        following[i, :PREFIX + j + 1] = np.concatenate([prompt[i], drafts[i, :j], nxt[i:i + 1]])
    ref = np.asarray(mamba2.forward(params, CFG, following))
    for i, j in enumerate(accepted):
        assert_close(step[i], ref[i, PREFIX + j], rtol=1e-4, name=f"row {i} next logits")
    with pytest.raises(ValueError, match=r"accepted must lie in 0..5"):
        mamba2.commit(record, jnp.asarray([0, 6, 1], jnp.int32))

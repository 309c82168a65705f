"""Named tolerance helpers for the suite's numeric comparisons.

* :func:`assert_close`: a result against an oracle or another algorithm, with a tolerance the caller
  derives and states.
* :func:`assert_same_up_to_rounding`: floats from two compiled programs that compute the same function
  (a few ulps of the dtype, never bitwise).
* :func:`assert_same_greedy_tokens`: token ids from two compiled programs (equal up to the first near tie).

Exact comparisons (``np.testing.assert_array_equal``) are for one program against itself, data movement
(copies, windows, caches, stored bytes), exactly representable arithmetic, and token ids taken from the
very same logits.
"""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np


def assert_close(actual, expected, *, rtol: float, atol: float = 0.0, name: str = "value") -> None:
    """Fail on NaN/Inf or when ``|actual - expected| > atol + rtol * max|expected|``.

    The bound is relative to the largest magnitude of ``expected`` (not elementwise), which is the
    right scale for sums of many terms where single entries can cancel to near zero. The message
    reports the max absolute error and the relative RMS error.
    """
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    assert np.all(np.isfinite(a)), f"{name}: non-finite values in result"
    assert np.all(np.isfinite(e)), f"{name}: non-finite values in expected"
    err = np.abs(a - e)
    scale = float(np.max(np.abs(e), initial=0.0))
    max_err = float(np.max(err, initial=0.0))
    rms = float(np.sqrt(np.mean((a - e) ** 2)) / max(np.sqrt(np.mean(e**2)), 1e-300)) if e.size else 0.0
    bound = atol + rtol * scale
    assert max_err <= bound, (
        f"{name}: max abs error {max_err:.3e} > bound {bound:.3e} (rtol={rtol}, atol={atol}, "
        f"scale={scale:.3e}); relative RMS error {rms:.3e}"
    )


def rounding_bound(values, *, ulps: float, scale: float | None = None) -> float:
    """``ulps * finfo(dtype).eps * scale``: ``ulps`` units in the last place of ``values``' dtype at ``scale``
    (default ``max|values|``), i.e. how far two roundings of the same computation may fall apart."""
    eps = float(jnp.finfo(np.asarray(values).dtype).eps)
    if scale is None:
        scale = float(np.max(np.abs(np.asarray(values, np.float64)), initial=0.0))
    return ulps * eps * scale


def assert_same_up_to_rounding(actual, expected, *, name: str, ulps: float = 8, scale: float | None = None) -> None:
    """Floats from two *different compiled programs* that compute the same mathematical function.

    Two programs (with and without ``lengths``, jit and eager, a scan and an unrolled loop, a step form
    and a full form, or one graph compiled on an AVX-512 and on an AVX2 machine) are not bit-identical:
    XLA fuses them differently, contracts ``a * b + c`` into one FMA (one rounding instead of two) in
    some and not in others, and vectorises with different widths. They agree to a few units in the last
    place of the dtype, not bit for bit, so ``assert_array_equal`` between them is machine dependent
    (issue 8: a conv with vs without ``lengths`` differed by 5.96e-8 on an AVX2 machine).

    Checks that shapes and dtypes are equal and that
    ``max|actual - expected| <= ulps * finfo(dtype).eps * scale``. ``scale`` defaults to ``max|expected|``;
    where terms may cancel, pass the magnitude of the summed terms instead (a sum of n terms rounds to
    within ``n * eps/2 * Σ|term|`` of the exact value, so two programs agree to ``n * eps * Σ|term|``).
    Default 8 ulps (float32: 9.5e-7 relative; bfloat16: 6.3e-2, float16: 7.8e-3, i.e. a few roundings
    of a half-precision result): a K-term sum (K <= 5 here) with or without FMA contraction moves by at
    most ~K/2 ulps; the largest gap measured between such programs is 0.8 ulps of the terms' magnitude
    (conv step vs full form and with vs without ``lengths``, each pair built for AVX-512, AVX2 and SSE4.2).
    A real bug (a wrong tap, a lost bias) is O(1) relative.
    Comparisons through deeper computations pass a larger ``ulps`` and say why at the call.
    """
    a, e = np.asarray(actual), np.asarray(expected)
    assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != expected {e.dtype}"
    eps = float(jnp.finfo(e.dtype).eps)
    bound = rounding_bound(e, ulps=ulps, scale=scale)
    assert_close(a, e, rtol=0.0, atol=bound, name=f"{name} ({ulps} ulps of {e.dtype}, eps={eps:.2e})")


def greedy_margins(logits) -> np.ndarray:
    """Top-1 minus top-2 logit along the last axis: how far a greedy choice is from a tie (float64)."""
    top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def assert_same_greedy_tokens(actual, expected, margins, *, tie: float, name: str = "tokens") -> None:
    """Token ids chosen by two *different compiled programs* (a compiled generation loop and a Python
    loop, a padded batch and one row alone, ...): equal up to the first near tie of each row.

    ``margins[b, t]`` says how far the decision behind ``expected[b, t]`` was from flipping: for greedy
    decoding the top-1 minus top-2 logit (:func:`greedy_margins`), for sampling the same gap of the
    Gumbel-perturbed scores and of any top-k / top-p cut. Two programs' logits differ by rounding (see
    :func:`assert_same_up_to_rounding`), so a decision whose margin is below ``tie`` (twice the logits'
    rounding bound, stated by the caller) may legitimately go either way. Each row must agree exactly
    until its first difference; that position must be a near tie (``margin <= tie``); after it the row
    is not compared, because the programs continue from different tokens. A difference at a
    well-separated position (a wrong cache, a bad padding mask, an off-by-one key) fails.
    """
    a, e = np.atleast_2d(np.asarray(actual)), np.atleast_2d(np.asarray(expected))
    m = np.atleast_2d(np.asarray(margins, np.float64))
    assert a.shape == e.shape == m.shape, f"{name}: shapes {a.shape}, expected {e.shape}, margins {m.shape}"
    for row in range(a.shape[0]):
        diff = np.flatnonzero(a[row] != e[row])
        if diff.size:
            t = int(diff[0])
            assert m[row, t] <= tie, (
                f"{name}: row {row} first differs at step {t} ({a[row, t]} vs expected {e[row, t]}), where the "
                f"decision margin {m[row, t]:.3e} exceeds the rounding tie bound {tie:.3e}: not a near tie\n"
                f"actual   {a[row].tolist()}\nexpected {e[row].tolist()}"
            )


def count_jaxpr_eqns(jaxpr) -> int:
    """Equations in a jaxpr, those of nested jaxprs (loop bodies, branches) included: a program's size."""
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += count_jaxpr_eqns(sub)
    return total


def cli_on_the_suite_cache(monkeypatch):
    """A fixture's body (``yield from cli_on_the_suite_cache(monkeypatch)``) for tests that call
    ``ssdkit.models.cli.main`` in this process: the command turns on its own persistent XLA cache
    (``$SSDKIT_CACHE_DIR``, only programs that compile in over 0.5 s) for the rest of the process. Point it
    at the suite's run cache (tests/conftest.py), and give the suite's threshold back afterwards, so the
    command neither writes to ``~/.cache`` nor keeps later tests' programs out of the shared cache."""
    if jax.config.jax_compilation_cache_dir:
        monkeypatch.setenv("SSDKIT_CACHE_DIR", jax.config.jax_compilation_cache_dir)
    threshold = jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", threshold)


#: The tiny Mamba-2 (``ssdkit bench --model`` fields) and (rows, tokens) batch of the training-step tests:
#: tests/test_bench.py times its step through ``ssdkit bench --train`` and tests/test_train.py compares
#: the same steps, so each compiled program is built once a run (the suite's shared XLA cache).
TINY_TRAIN_MODEL = "d_model=32,n_layer=1,vocab_size=50,d_state=8,headdim=16,chunk_size=8"
TINY_TRAIN_BATCH = (2, 16)


def speculative_lookup_setup():
    """The tiny Mamba-2 config, the prompt-lookup ``Speculative`` and the greedy calling convention (batch,
    prompt length, new tokens, EOS id) of tests/test_speculative_generation.py's lookup tests. Plain data:
    tests/test_mamba2_layout.py inspects that very compiled program, so the run's shared XLA cache
    (tests/conftest.py) compiles it once."""
    import ssdkit
    from ssdkit.models import mamba2

    cfg = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=24, pad_vocab_size_multiple=8, d_state=8,
                              headdim=16, chunk_size=8, tie_embeddings=False)
    spec = ssdkit.Speculative(ssdkit.PromptLookup(), draft_tokens=4, round_costs=(1.0, 1.2, 1.3, 1.5))
    return cfg, spec, dict(batch=3, prompt_len=16, max_new_tokens=96, eos_token_id=3)

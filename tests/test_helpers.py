"""The comparison helpers themselves: what they accept and, above all, what they reject."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import assert_same_greedy_tokens, assert_same_up_to_rounding, greedy_margins


def test_same_up_to_rounding_allows_a_few_ulps_only():
    x = np.asarray([1.0, -2.0, 4.0], np.float32)
    eps = float(np.finfo(np.float32).eps)
    assert_same_up_to_rounding(x + np.float32(4 * 4 * eps), x, name="4 ulps of max|x| = 4")
    with pytest.raises(AssertionError, match="max abs error"):
        assert_same_up_to_rounding(x + np.float32(16 * 4 * eps), x, name="16 ulps")
    with pytest.raises(AssertionError, match="dtype"):
        assert_same_up_to_rounding(x.astype(np.float64), x, name="another dtype")
    # ``scale``: rounding relative to the summed terms, not to a result that cancelled to ~0.
    assert_same_up_to_rounding(np.float32([1e-7]), np.float32([0.0]), scale=2.0, name="cancelled")
    with pytest.raises(AssertionError):
        assert_same_up_to_rounding(np.float32([1e-7]), np.float32([0.0]), name="cancelled, no scale")
    half = jnp.asarray([1.0, 2.0], jnp.bfloat16)  # bfloat16 eps = 2^-7: 8 ulps of 2 = 0.125
    assert_same_up_to_rounding(half + jnp.bfloat16(0.125), half, name="bfloat16")


def test_same_greedy_tokens_stops_only_at_a_near_tie():
    assert greedy_margins(np.asarray([[0.0, 3.0, 2.5]])).tolist() == [0.5]
    expected = np.asarray([[1, 2, 3, 4], [5, 6, 7, 8]])
    margins = np.asarray([[1.0, 1e-6, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert_same_greedy_tokens(expected, expected, margins, tie=1e-5)
    # Row 0 differs first at a near tie (step 1): later steps may differ too.
    assert_same_greedy_tokens([[1, 9, 9, 9], [5, 6, 7, 8]], expected, margins, tie=1e-5)
    with pytest.raises(AssertionError, match="row 1 first differs at step 2"):
        assert_same_greedy_tokens([[1, 2, 3, 4], [5, 6, 0, 8]], expected, margins, tie=1e-5)
    with pytest.raises(AssertionError, match="row 0 first differs at step 0"):
        assert_same_greedy_tokens([[0, 9, 9, 9], [5, 6, 7, 8]], expected, margins, tie=1e-5)

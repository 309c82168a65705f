"""One named tolerance helper for every numeric comparison in the suite."""

from __future__ import annotations

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

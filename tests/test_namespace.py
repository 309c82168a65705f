"""The library's models install as ``ssdkit.models``: a user's own top-level ``models`` (a ``models.py``
or a ``models/`` package, as many projects have) beside their script neither shadows the library nor is
shadowed by it. Each case is a fresh Python process started in the user's folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = """
import sys

FOLDER = {folder!r}
if {user_first}:
    import models  # the user's, imported before the library
from ssdkit.models import mamba2
import models  # the user's, after the library
import jax
import jax.numpy as jnp
import numpy as np

assert models.WHO == "user" and models.__file__.startswith(FOLDER), models.__file__
assert mamba2.__name__ == "ssdkit.models.mamba2" and not mamba2.__file__.startswith(FOLDER), mamba2.__file__
# nothing of the library is registered under the top-level name "models"
theirs = [n for n, m in sys.modules.items() if (n == "models" or n.startswith("models."))
          and not (getattr(m, "__file__", None) or "").startswith(FOLDER)]
assert not theirs, theirs

if {generate}:  # the library runs: a tiny random model generates a few tokens (one small compile)
    cfg = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=16, chunk_size=8)
    # init_params' shapes, filled from numpy: init_params itself runs op by op (seconds on a busy CPU)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda key: mamba2.init_params(cfg, key), jax.random.key(0))
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
    out = mamba2.generate(params, cfg, jnp.asarray([[1, 2, 3]], jnp.int32), max_new_tokens=3)
    assert out.tokens.shape == (1, 3) and int(out.lengths[0]) == 3, out
assert sys.modules["models"] is models and models.WHO == "user"
print("ok")
"""


# generate's compile is the slow part (seconds): once is enough, the package case checks imports only
@pytest.mark.parametrize("layout, user_first, generate", [("module", True, True), ("package", False, False)])
def test_user_models_beside_the_library(tmp_path, layout, user_first, generate):
    if layout == "module":
        (tmp_path / "models.py").write_text('WHO = "user"\n')
    else:  # a package with a mamba2 of its own, which `from ssdkit.models import mamba2` must not pick
        (tmp_path / "models").mkdir()
        (tmp_path / "models" / "__init__.py").write_text('WHO = "user"\n')
        (tmp_path / "models" / "mamba2.py").write_text('raise ImportError("the user\'s models.mamba2 was imported")\n')
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(folder=str(tmp_path), user_first=user_first, generate=generate)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"

"""Small recurrences built on ssdkit's primitives, proving the core is generic.

* :mod:`models.toy.retention` — retention: fixed per-head scalar decay ``γ_h = 1 - 2^(-5-h)``.
* :mod:`models.toy.gla` — gated linear attention: data-dependent decay per state channel, short conv.

Both plug a mixer into :class:`models.toy.lm.ToyLM`, a tiny language model that implements the
``ssdkit.generate`` model protocol; they also serve as the generation loop's test models.
"""

from models.toy.gla import GLA
from models.toy.lm import ToyConfig, ToyLM, ToyParams
from models.toy.retention import Retention

__all__ = ["GLA", "Retention", "ToyConfig", "ToyLM", "ToyParams"]

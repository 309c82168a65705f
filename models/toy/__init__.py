"""Small recurrences built on ssdkit's primitives, proving the core is generic.

* :mod:`ssdkit.models.toy.retention` — retention: fixed per-head scalar decay ``γ_h = 1 - 2^(-5-h)``.
* :mod:`ssdkit.models.toy.gla` — gated linear attention: data-dependent decay per state channel, short conv.

Both plug a mixer into :class:`ssdkit.models.toy.lm.ToyLM`, a tiny language model that implements the
``ssdkit.generate`` model protocol; they also serve as the generation loop's test models.
"""

from ssdkit.models.toy.gla import GLA
from ssdkit.models.toy.lm import ToyConfig, ToyLM, ToyParams
from ssdkit.models.toy.retention import Retention

__all__ = ["GLA", "Retention", "ToyConfig", "ToyLM", "ToyParams"]

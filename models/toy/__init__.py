"""Small recurrences built on ssdkit's primitives, proving the core is generic.

* :mod:`ssdkit.models.toy.retention` — retention: fixed per-head scalar decay ``γ_h = 1 - 2^(-5-h)``.
* :mod:`ssdkit.models.toy.gla` — gated linear attention: data-dependent decay per state channel, short conv.

Each is a mixer (:class:`ssdkit.Mixer`): ``ssdkit.MixerLM(ssdkit.LMConfig(...), GLA())`` is a language model
for ``ssdkit.generate`` (speculative decoding included) and ``ssdkit.make_train_step``.
"""

from ssdkit.models.toy.gla import GLA
from ssdkit.models.toy.retention import Retention

__all__ = ["GLA", "Retention"]

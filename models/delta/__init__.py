"""The delta-rule family's layers as mixers (:class:`ssdkit.Mixer`), on ``ssdkit.delta_rule``'s scan inputs.

* :mod:`ssdkit.models.delta.deltanet` — DeltaNet (Yang et al. 2024): the delta rule, L2-normed q, k, β per head.
* :mod:`ssdkit.models.delta.gated_deltanet` — Gated DeltaNet (Yang et al. 2025): a Mamba-2 decay per head,
  the output gated.

``ssdkit.MixerLM(ssdkit.LMConfig(...), DeltaNet())`` is a language model; ``ssdkit train --arch deltanet``.
"""

from ssdkit.models.delta.deltanet import DeltaNet
from ssdkit.models.delta.gated_deltanet import GatedDeltaNet

__all__ = ["DeltaNet", "GatedDeltaNet"]

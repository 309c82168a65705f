"""The delta-rule family's layers as mixers (:class:`ssdkit.Mixer`), each a diagonal-plus-rank-one recurrence.

* :mod:`ssdkit.models.delta.deltanet` — DeltaNet (Yang et al. 2024): the delta rule, L2-normed q, k, β per head.
* :mod:`ssdkit.models.delta.gated_deltanet` — Gated DeltaNet (Yang et al. 2025): a Mamba-2 decay per head,
  the output gated.
* :mod:`ssdkit.models.delta.kda` — Kimi Delta Attention: the gated delta rule with a decay per key channel.
* :mod:`ssdkit.models.delta.rwkv7` — RWKV-7's block: time mixing (a general diagonal-plus-rank-one
  transition) and channel mixing.

``ssdkit.MixerLM(ssdkit.LMConfig(...), DeltaNet())`` is a language model; ``ssdkit train --arch deltanet``.
"""

from ssdkit.models.delta.deltanet import DeltaNet
from ssdkit.models.delta.gated_deltanet import GatedDeltaNet
from ssdkit.models.delta.kda import KDA
from ssdkit.models.delta.rwkv7 import RWKV7

__all__ = ["KDA", "RWKV7", "DeltaNet", "GatedDeltaNet"]

"""The delta-rule family as mixers (:class:`ssdkit.Mixer`), each a diagonal-plus-rank-one recurrence."""

from ssdkit.models.delta.kda import KDA
from ssdkit.models.delta.rwkv7 import RWKV7

__all__ = ["KDA", "RWKV7"]

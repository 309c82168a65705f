"""Shape names used in every signature of ssdkit.

Legend of dimension letters (jaxtyping axis names):

    batch   batch rows                      seq     time steps (tokens)
    heads   H, recurrence heads             hdim    P, head dimension (value width)
    state   N, state dimension (key width)  groups  G, groups sharing B/C (H % G == 0)
    chunk   number of chunks                q/k     position inside a chunk (Q = chunk size)
    width   K - 1, carried conv window      chan    conv / feature channels
    layers  stacked layers                  vocab   (padded) vocabulary
    groups_or_heads  G or H: rank-one factors w, u per group (like b) or per head

The recurrent state of one head is a (P, N) matrix, so a batch of states is
``(batch, heads, hdim, state)`` and always lives in float32 (float64 under x64 tests).
"""

from __future__ import annotations

from jaxtyping import Array, Bool, Float, Int

# Sequence-form inputs of the recurrence.
SeqValues = Float[Array, "batch seq heads hdim"]
SeqScalarLogDecay = Float[Array, "batch seq heads"]
SeqDiagLogDecay = Float[Array, "batch seq heads state"]
SeqLogDecay = SeqScalarLogDecay | SeqDiagLogDecay
SeqKeys = Float[Array, "batch seq groups state"]
SegmentIds = Int[Array, "batch seq"]
# Rank-one factors w, u of a diagonal-plus-rank-one transition: per group (G) or per head (H).
SeqRankOne = Float[Array, "batch seq groups_or_heads state"]

# Single-step inputs.
StepValues = Float[Array, "batch heads hdim"]
StepScalarLogDecay = Float[Array, "batch heads"]
StepDiagLogDecay = Float[Array, "batch heads state"]
StepLogDecay = StepScalarLogDecay | StepDiagLogDecay
StepKeys = Float[Array, "batch groups state"]
StepRankOne = Float[Array, "batch groups_or_heads state"]

# Recurrent state (float32 or wider).
State = Float[Array, "batch heads hdim state"]

# Convolution.
ConvSeq = Float[Array, "batch seq chan"]
ConvStep = Float[Array, "batch chan"]
ConvWindow = Float[Array, "batch width chan"]
ConvWeight = Float[Array, "kernel chan"]
ConvBias = Float[Array, " chan"]

# Token ids and masks.
Tokens = Int[Array, "batch seq"]
StepTokens = Int[Array, " batch"]
Lengths = Int[Array, " batch"]
Mask = Bool[Array, "batch seq"]
Logits = Float[Array, "batch vocab"]
SeqLogits = Float[Array, "batch seq vocab"]

__all__ = [name for name in dir() if name[0].isupper()]

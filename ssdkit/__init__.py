"""ssdkit: structured state-space (SSD) recurrences in plain JAX.

Core primitives (one JAX source for CPU, GPU and TPU):

* :func:`ssd_scan` — chunked prefill (dual form inside chunks, linear scan across chunks);
* :func:`ssd_step` — O(1) single-step decode update;
* :func:`ssd_reference` — the sequential oracle;
* :func:`ssd_verify` / :func:`ssd_commit` / :func:`conv_commit` — verify k steps in one scan, then keep any
  prefix of them (speculative decoding's rollback, ``ssdkit.core.rollback``);
* :func:`generate` — the compiled generation loop, plain or speculative (:class:`Speculative` with
  :class:`PromptLookup`, :class:`DraftModel` or your own :class:`DraftSource`, ``ssdkit.inference``);
* :class:`Recurrence` — the structural conditions, with input validation;
* :class:`Mixer` / :class:`MixerLM` — a layer written once against :class:`LayerOps` (its convs and scan),
  made a language model with prefill, decode, speculative verify/commit, training loss and mesh rules;
* :func:`sequence_matmul_dtype` / :func:`sequence_einsum` — the dtype whole-sequence products run in, and
  such a product: bfloat16 where this machine multiplies it faster (:class:`MatmulProbe`,
  ``ssdkit.matmul_probe``), else float32, accumulated in float32.
"""

from ssdkit.core.cache import RecurrentCache
from ssdkit.core.conv import causal_conv1d, causal_conv1d_step
from ssdkit.core.delta import DeltaInputs, delta_rule
from ssdkit.core.layers import scan_layers, stack, unstack
from ssdkit.core.mixer import LayerOps, Mixer
from ssdkit.core.norm import gated_rms_norm, l2_norm, layer_norm, rms_norm
from ssdkit.core.recurrence import DecayKind, RankOne, Recurrence
from ssdkit.core.reference import ssd_reference
from ssdkit.core.rollback import ScanRecord, conv_commit, ssd_commit, ssd_verify
from ssdkit.core.scan import preferred_chunk_size, ssd_scan
from ssdkit.core.step import ssd_step
from ssdkit.dtypes import accumulation_dtype, sequence_einsum, sequence_matmul_dtype
from ssdkit.inference.drafts import DraftModel, DraftSource, PromptLookup, Speculative
from ssdkit.inference.loop import generate, generate_stream, lower_generate
from ssdkit.inference.protocol import GenerationResult, LanguageModel, SpeculationStats, SpeculativeModel
from ssdkit.inference.sampling import Greedy, Penalties, Sample, make_sampler
from ssdkit.lm import LMConfig, MixerLM
from ssdkit.matmul_probe import MatmulProbe
from ssdkit.training.loss import CrossEntropySums, LossMetrics, head_cross_entropy, next_token_targets
from ssdkit.training.step import StepMetrics, TrainState, adamw, make_train_step

__all__ = [
    "CrossEntropySums",
    "DecayKind",
    "DeltaInputs",
    "DraftModel",
    "DraftSource",
    "GenerationResult",
    "Greedy",
    "LanguageModel",
    "LayerOps",
    "LMConfig",
    "LossMetrics",
    "MatmulProbe",
    "Mixer",
    "MixerLM",
    "Penalties",
    "PromptLookup",
    "RankOne",
    "RecurrentCache",
    "ScanRecord",
    "Recurrence",
    "accumulation_dtype",
    "adamw",
    "causal_conv1d",
    "causal_conv1d_step",
    "conv_commit",
    "delta_rule",
    "gated_rms_norm",
    "generate",
    "generate_stream",
    "layer_norm",
    "lower_generate",
    "head_cross_entropy",
    "l2_norm",
    "make_sampler",
    "make_train_step",
    "next_token_targets",
    "preferred_chunk_size",
    "rms_norm",
    "Sample",
    "Speculative",
    "SpeculationStats",
    "SpeculativeModel",
    "StepMetrics",
    "TrainCheckpointer",
    "TrainState",
    "scan_layers",
    "sequence_einsum",
    "sequence_matmul_dtype",
    "stack",
    "unstack",
    "ssd_reference",
    "ssd_commit",
    "ssd_scan",
    "ssd_step",
    "ssd_verify",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: ssdkit.training.checkpoints imports orbax-checkpoint (about 0.3 s), which only training needs.
    if name == "TrainCheckpointer":
        from ssdkit.training.checkpoints import TrainCheckpointer

        return TrainCheckpointer
    raise AttributeError(f"module 'ssdkit' has no attribute {name!r}")

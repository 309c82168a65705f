"""ssdkit: structured state-space (SSD) recurrences in plain JAX.

Core primitives (one JAX source for CPU, GPU and TPU):

* :func:`ssd_scan` — chunked prefill (dual form inside chunks, linear scan across chunks);
* :func:`ssd_step` — O(1) single-step decode update;
* :func:`ssd_reference` — the sequential oracle;
* :func:`ssd_verify` / :func:`ssd_commit` / :func:`conv_commit` — verify k steps in one scan, then keep any
  prefix of them (speculative decoding's rollback, ``ssdkit.speculative``);
* :func:`generate` — the compiled generation loop, plain or speculative (:class:`Speculative` with
  :class:`PromptLookup` or :class:`DraftModel` drafts, ``ssdkit.speculative_loop``);
* :class:`Recurrence` — the structural conditions, with input validation.
"""

from ssdkit.cache import RecurrentCache
from ssdkit.conv import causal_conv1d, causal_conv1d_step
from ssdkit.drafts import DraftModel, PromptLookup, Speculative, SpeculativeModel
from ssdkit.dtypes import accumulation_dtype, sequence_matmul_dtype
from ssdkit.generate import (
    GenerationResult,
    Greedy,
    LanguageModel,
    Sample,
    SpeculationStats,
    generate,
    generate_stream,
    make_sampler,
)
from ssdkit.loss import CrossEntropySums, LossMetrics, head_cross_entropy, next_token_targets
from ssdkit.norm import gated_rms_norm, rms_norm
from ssdkit.recurrence import DecayKind, Recurrence
from ssdkit.reference import ssd_reference
from ssdkit.scan import preferred_chunk_size, ssd_scan
from ssdkit.speculative import ScanRecord, conv_commit, ssd_commit, ssd_verify
from ssdkit.stack import scan_layers, stack, unstack
from ssdkit.step import ssd_step
from ssdkit.train import StepMetrics, TrainState, adamw, make_train_step

__all__ = [
    "CrossEntropySums",
    "DecayKind",
    "DraftModel",
    "GenerationResult",
    "Greedy",
    "LanguageModel",
    "LossMetrics",
    "PromptLookup",
    "RecurrentCache",
    "ScanRecord",
    "Recurrence",
    "accumulation_dtype",
    "adamw",
    "causal_conv1d",
    "causal_conv1d_step",
    "conv_commit",
    "gated_rms_norm",
    "generate",
    "generate_stream",
    "head_cross_entropy",
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
    # Lazy: ssdkit.checkpointing imports orbax-checkpoint (about 0.3 s), which only training needs.
    if name == "TrainCheckpointer":
        from ssdkit.checkpointing import TrainCheckpointer

        return TrainCheckpointer
    raise AttributeError(f"module 'ssdkit' has no attribute {name!r}")

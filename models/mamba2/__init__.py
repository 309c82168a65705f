"""Mamba-2 on ssdkit: config, parameters, checkpoints, forward / prefill / decode, generation."""

from ssdkit.models.mamba2.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssdkit.models.mamba2.config import Mamba2Config
from ssdkit.models.mamba2.model import (
    Mamba2LM,
    VerifyRecord,
    commit,
    decode_step,
    forward,
    generate,
    generate_stream,
    init_cache,
    loss,
    lower_generate,
    prefill,
    recurrence,
    score_window,
    verify,
)
from ssdkit.models.mamba2.params import (
    Mamba2LayerParams,
    Mamba2Params,
    cast_params,
    init_params,
    stack_layers,
    unstack_layers,
)
from ssdkit.models.mamba2.pretrained import Pretrained, load_pretrained, pretrained_path
from ssdkit.models.mamba2.tokenizer import load_tokenizer

__all__ = [
    "CheckpointError",
    "Mamba2Config",
    "Mamba2LM",
    "Mamba2LayerParams",
    "Mamba2Params",
    "Pretrained",
    "cast_params",
    "VerifyRecord",
    "commit",
    "decode_step",
    "forward",
    "generate",
    "generate_stream",
    "init_cache",
    "init_params",
    "load_checkpoint",
    "load_pretrained",
    "loss",
    "load_tokenizer",
    "lower_generate",
    "prefill",
    "verify",
    "pretrained_path",
    "recurrence",
    "save_checkpoint",
    "score_window",
    "stack_layers",
    "unstack_layers",
]

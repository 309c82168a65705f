"""Mamba-2 on ssdkit: config, parameters, checkpoints, forward / prefill / decode, generation."""

from models.mamba2.config import Mamba2Config
from models.mamba2.model import (
    Mamba2LM,
    decode_step,
    forward,
    generate,
    generate_stream,
    init_cache,
    prefill,
    recurrence,
)
from models.mamba2.params import Mamba2LayerParams, Mamba2Params, cast_params, init_params

__all__ = [
    "Mamba2Config",
    "Mamba2LM",
    "Mamba2LayerParams",
    "Mamba2Params",
    "cast_params",
    "decode_step",
    "forward",
    "generate",
    "generate_stream",
    "init_cache",
    "init_params",
    "prefill",
    "recurrence",
]

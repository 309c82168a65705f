"""Analytic FLOP and byte counts of Mamba-2 inference and training (documented in docs/benchmarks.md).

A multiply-add counts as 2 FLOPs. Per layer and token, with D = d_model, E = d_in_proj, C = conv_dim,
I = d_inner, H heads of P channels, G groups of N states, K = d_conv, Q = chunk size::

    in_proj   2·D·E                out_proj  2·I·D                conv  2·K·C
    SSD, chunked (prefill):  2·Q·(G·N + H·P)   (intra-chunk C·Bᵀ and scores·x, full Q×Q blocks)
                           + 4·H·P·N           (chunk states, carried-state output)
    SSD, one step (decode):  4·H·P·N           (state update, readout)

plus 2·D·V for the LM head, once per sequence in prefill (last position only) and once per token in
decode. Norms, gates and activations (O(D + I) per token) are left out. Bytes per decode step are every
weight read once plus the cache read and written once; a prefill's compulsory bytes are every weight read
once, the cache written once and the tokens read (activations that could stay in cache are not counted),
so the arithmetic intensity FLOPs / bytes places a workload on the roofline (docs/benchmarks.md).

A training step counts 3x the forward pass over every position (the backward pass of a product costs two
products: one for the input's gradient, one for the weight's), with the LM head at every position that
has a next token: ``3 · (batch · seq · n_layer · (projections + SSD chunked) + batch · (seq - 1) · 2·D·V)``,
which is ``6 · parameters · tokens`` plus the scan's terms. Recomputation (remat, the head's blocks) and
the optimiser's O(parameters) update are not counted: MFU credits only the work the model needs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ssdkit.models.mamba2.config import Mamba2Config


def _projections(cfg: Mamba2Config) -> int:
    return 2 * cfg.d_model * cfg.d_in_proj + 2 * cfg.d_inner * cfg.d_model + 2 * cfg.d_conv * cfg.conv_dim


def _chunked_layers_per_token(cfg: Mamba2Config, seq: int, chunk_size: int | None) -> int:
    """Every layer's FLOPs per token of a chunked pass over ``seq`` tokens (LM head excluded)."""
    q = min(chunk_size or cfg.chunk_size, seq)
    ssd = 2 * q * (cfg.ngroups * cfg.d_state + cfg.nheads * cfg.headdim) + 4 * cfg.nheads * cfg.headdim * cfg.d_state
    return cfg.n_layer * (_projections(cfg) + ssd)


def prefill_flops(cfg: Mamba2Config, batch: int, seq: int, chunk_size: int | None = None) -> float:
    """FLOPs of one prefill of ``batch`` sequences of ``seq`` tokens (LM head at the last position)."""
    per_token = _chunked_layers_per_token(cfg, seq, chunk_size)
    return float(batch) * (seq * per_token + 2 * cfg.d_model * cfg.padded_vocab_size)


def train_flops(cfg: Mamba2Config, batch: int, seq: int, chunk_size: int | None = None) -> float:
    """FLOPs of one training step (forward and backward) on ``batch`` rows of ``seq`` tokens."""
    per_token = _chunked_layers_per_token(cfg, seq, chunk_size)
    return 3.0 * batch * (seq * per_token + (seq - 1) * 2 * cfg.d_model * cfg.padded_vocab_size)


def decode_flops(cfg: Mamba2Config, batch: int) -> float:
    """FLOPs of one decode step for ``batch`` rows."""
    ssd = 4 * cfg.nheads * cfg.headdim * cfg.d_state
    return float(batch) * (cfg.n_layer * (_projections(cfg) + ssd) + 2 * cfg.d_model * cfg.padded_vocab_size)


@dataclasses.dataclass(frozen=True)
class DecodeBytes:
    weights: float  # every parameter read once (an int for dtypes; fractional for quantised formats)
    cache: float  # conv windows and states, read and written once each

    @property
    def total(self) -> float:
        return self.weights + self.cache


def _itemsize(weight_dtype) -> float:
    """Bytes per weight: a dtype's size, or a number given directly (e.g. 34 / 32 for GGUF's q8_0 blocks)."""
    return weight_dtype if isinstance(weight_dtype, int | float) else jnp.dtype(weight_dtype).itemsize


def _weight_bytes(cfg: Mamba2Config, weight_dtype):
    """Every parameter once: A_log, D and dt_bias in float32, the rest in ``weight_dtype``."""
    f32_params = 3 * cfg.n_layer * cfg.nheads
    return (cfg.num_params() - f32_params) * _itemsize(weight_dtype) + f32_params * 4


def _cache_bytes(cfg: Mamba2Config, batch: int, weight_dtype):
    """One copy of the cache: float32 states and conv windows in ``weight_dtype``."""
    state = cfg.n_layer * batch * cfg.nheads * cfg.headdim * cfg.d_state * 4
    conv = cfg.n_layer * batch * (cfg.d_conv - 1) * cfg.conv_dim * _itemsize(weight_dtype)
    return state + conv


def decode_bytes(cfg: Mamba2Config, batch: int, weight_dtype=jnp.float32) -> DecodeBytes:
    """Bytes moved by one decode step: weights (A_log, D, dt_bias in float32) plus the cache.

    ``weight_dtype`` is a dtype, or bytes per weight for formats that are not one (quantised GGUF files).
    """
    return DecodeBytes(weights=_weight_bytes(cfg, weight_dtype), cache=2 * _cache_bytes(cfg, batch, weight_dtype))


def prefill_bytes(cfg: Mamba2Config, batch: int, seq: int, weight_dtype=jnp.float32) -> float:
    """Compulsory bytes of one prefill: every weight once, the cache written once, the int32 tokens."""
    return _weight_bytes(cfg, weight_dtype) + _cache_bytes(cfg, batch, weight_dtype) + 4 * batch * seq

"""A tiny language model around any mixer: embedding → [RMSNorm → mixer → residual]* → RMSNorm → head.

A mixer is a hashable object with ``recurrence(cfg)``, ``conv_channels(cfg)``, ``init_layer(cfg, key)``
(one layer's params, a PyTree holding a ``norm`` weight) and
``__call__(cfg, lp, h, cache, *, step) -> (out, cache)``: ``h`` is (batch, seq, d_model) for prefill
or (batch, d_model) for one decode step; the same call serves both. A mixer that also takes
``segment_ids`` (batch, seq) can train on packed documents (``loss(..., segment_ids=...)``, which passes
it only when given): it resets its conv window and state at each change of id.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

import ssdkit
from ssdkit import RecurrentCache


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    d_model: int = 32
    n_layer: int = 2
    num_heads: int = 4
    head_dim: int = 8
    state_dim: int = 8
    num_groups: int = 1
    chunk_size: int = 16
    conv_kernel: int = 1
    norm_eps: float = 1e-6
    embedding_std: float = 0.02  # of the tied embedding / head at init (as Mamba-2; 1.0 with a tied head stalls)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ToyParams:
    embedding: jax.Array  # (vocab, d_model), tied head
    layers: Any  # the mixer's layer params, stacked on axis 0
    norm_f: jax.Array  # (d_model,)


@dataclasses.dataclass(frozen=True)
class ToyLM:
    """Model protocol for ``ssdkit.generate``: ``prefill`` and ``decode``."""

    cfg: ToyConfig
    mixer: Any

    def init(self, key: jax.Array, dtype=jnp.float32) -> ToyParams:
        k_emb, k_layers = jax.random.split(key)
        layers = jax.vmap(lambda k: self.mixer.init_layer(self.cfg, k))(
            jax.random.split(k_layers, self.cfg.n_layer)
        )
        layers = jax.tree_util.tree_map(lambda a: a.astype(dtype), layers)
        emb = self.cfg.embedding_std * jax.random.normal(k_emb, (self.cfg.vocab_size, self.cfg.d_model), dtype)
        return ToyParams(embedding=emb, layers=layers, norm_f=jnp.ones((self.cfg.d_model,), dtype))

    def init_cache(self, batch: int, dtype=jnp.float32) -> RecurrentCache:
        """Zero cache; the state is float32 (float64 for float64 params, for oracle tests)."""
        return RecurrentCache.zeros(
            self.mixer.recurrence(self.cfg), batch=batch, kernel_size=self.cfg.conv_kernel,
            conv_channels=self.mixer.conv_channels(self.cfg), num_layers=self.cfg.n_layer, conv_dtype=dtype,
            state_dtype=ssdkit.accumulation_dtype(dtype),
        )

    def _hidden(self, params: ToyParams, tokens, cache, *, step: bool, remat: str = "none", segment_ids=None):
        packed = {} if segment_ids is None else {"segment_ids": segment_ids}  # mixers without it still work

        def layer(lp, res, c):
            h = ssdkit.rms_norm(res, lp.norm, eps=self.cfg.norm_eps)
            out, c = self.mixer(self.cfg, lp, h, c, step=step, **packed)
            return res + out, c

        res, cache = ssdkit.scan_layers(layer, params.layers, params.embedding[tokens], cache, remat=remat)
        return ssdkit.rms_norm(res, params.norm_f, eps=self.cfg.norm_eps), cache

    def _run(self, params: ToyParams, tokens, cache, *, step: bool):
        h, cache = self._hidden(params, tokens, cache, step=step)
        return h @ params.embedding.T, cache

    def loss(self, params: ToyParams, tokens: jax.Array, *, segment_ids=None, loss_mask=None, remat: str = "none"):
        """Next-token cross-entropy ``(loss, ssdkit.LossMetrics)`` (blockwise head, as Mamba-2's);
        ``segment_ids`` packs documents in a row (the mixer resets its state at each change)."""
        targets, weights = ssdkit.next_token_targets(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
        cache = self.init_cache(tokens.shape[0], params.embedding.dtype)
        h, _ = self._hidden(params, tokens, cache, step=False, remat=remat, segment_ids=segment_ids)
        metrics = ssdkit.head_cross_entropy(h[:, :-1], params.embedding, targets, weights).metrics()
        return metrics.loss, metrics

    def forward(self, params: ToyParams, tokens: jax.Array) -> jax.Array:
        """Logits (batch, seq, vocab) at every position."""
        cache = self.init_cache(tokens.shape[0], params.embedding.dtype)
        return self._run(params, tokens, cache, step=False)[0]

    def prefill(self, params: ToyParams, tokens: jax.Array, cache: RecurrentCache | None = None):
        """``(last_logits (batch, vocab), cache)``, continuing from ``cache`` if given."""
        cache = self.init_cache(tokens.shape[0], params.embedding.dtype) if cache is None else cache
        logits, cache = self._run(params, tokens, cache, step=False)
        return logits[:, -1], cache

    def decode(self, params: ToyParams, token: jax.Array, cache: RecurrentCache):
        """One token per row: ``(logits (batch, vocab), cache)``."""
        return self._run(params, token, cache, step=True)

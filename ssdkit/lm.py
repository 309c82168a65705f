"""A language model around any mixer: embedding → [RMSNorm → mixer → residual]* → RMSNorm → tied head.

(A mixer with ``pre_norm = False`` takes the residual stream un-normed: ``[mixer → residual]*``.)

:class:`MixerLM` turns a :class:`~ssdkit.core.mixer.Mixer` (a layer written once against
:class:`~ssdkit.core.mixer.LayerOps`) into everything the rest of ssdkit takes: ``prefill`` (with ragged
``lengths``), ``decode``, ``verify`` / ``commit`` (speculative decoding, :func:`ssdkit.generate`),
``loss`` with packed ``segment_ids`` (:func:`ssdkit.make_train_step`), ``score_window`` (a stream scored
window by window, the state carried: ``ssdkit eval``), and sharding rules for a mesh
(:meth:`MixerLM.param_specs`). The recurrent parts (convs, scan, their cache and rollback) are
ssdkit's; the mixer only computes the recurrence's inputs and its output.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssdkit._typing import Lengths, Logits, SegmentIds, SeqLogits, StepTokens, Tokens
from ssdkit.core.cache import RecurrentCache
from ssdkit.core.layers import is_per_layer, scan_layers
from ssdkit.core.mixer import LayerRecord, Mixer, check_mixer, commit_layer, conv_spec, run_layer
from ssdkit.core.norm import rms_norm
from ssdkit.dtypes import accumulation_dtype
from ssdkit.training.loss import CrossEntropySums, LossMetrics, head_cross_entropy, next_token_targets
from ssdkit.xla_options import inference_jit


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Shapes of a :class:`MixerLM`; the mixer reads the ones it needs (heads, state size, ...).

    Attributes:
        vocab_size: V, the embedding's rows (token ids must be below it).
        d_model: D, the residual width.
        n_layer: number of layers.
        num_heads, head_dim, state_dim, num_groups: the recurrence's H, P, N, G as the mixer uses them.
        chunk_size: the chunked scan's Q.
        conv_kernel: K of every short conv (the cache keeps K-1 inputs per conv).
        norm_eps: RMSNorm epsilon.
        embedding_std: standard deviation of the tied embedding / head at init.
    """

    vocab_size: int
    d_model: int = 32
    n_layer: int = 2
    num_heads: int = 4
    head_dim: int = 8
    state_dim: int = 8
    num_groups: int = 1
    chunk_size: int = 16
    conv_kernel: int = 4
    norm_eps: float = 1e-6
    embedding_std: float = 0.02

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layer", "num_heads", "head_dim", "state_dim", "num_groups",
                     "chunk_size", "conv_kernel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_groups:
            raise ValueError(f"LMConfig.num_groups={self.num_groups} must divide num_heads={self.num_heads}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"LMConfig.norm_eps must be a positive number, got {self.norm_eps!r}")
        if not (math.isfinite(self.embedding_std) and self.embedding_std > 0):
            raise ValueError(f"LMConfig.embedding_std must be a positive number, got {self.embedding_std!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """One layer (stacked: every leaf has the layer axis first): the pre-norm weight (None for a mixer that
    norms its input itself, ``pre_norm = False``) and the mixer's params."""

    norm: jax.Array | None  # (d_model,)
    mixer: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LMParams:
    """Parameters of a :class:`MixerLM`.

    Attributes:
        embedding: (vocab, d_model), also the head (tied).
        layers: :class:`LayerParams`, stacked on axis 0 or a tuple of per-layer ones (:func:`ssdkit.unstack`).
        norm_f: (d_model,) the final RMSNorm's weight.
    """

    embedding: jax.Array
    layers: Any
    norm_f: jax.Array


@dataclasses.dataclass(frozen=True)
class MixerLM:
    """A language model of ``cfg.n_layer`` layers of ``mixer`` (module docstring): a
    :class:`~ssdkit.SpeculativeModel` for :func:`ssdkit.generate`, with ``loss`` for training."""

    cfg: LMConfig
    mixer: Mixer

    def __post_init__(self):
        check_mixer(self.mixer)
        spec = self.mixer.recurrence(self.cfg)
        if spec.chunk_size != self.cfg.chunk_size:
            raise ValueError(f"{type(self.mixer).__name__}.recurrence has chunk_size {spec.chunk_size}, the config "
                             f"{self.cfg.chunk_size}")

    @property
    def pre_norm(self) -> bool:
        """Whether the stack RMS-norms each layer's input (the default). A mixer with ``pre_norm = False``
        gets the residual stream itself and norms what it needs (a block of several sublayers, as RWKV's
        time and channel mixing); its output is added to the stream either way."""
        return bool(getattr(self.mixer, "pre_norm", True))

    # ------------------------------------------------------------------ params and cache
    def init(self, key: jax.Array, dtype=jnp.float32) -> LMParams:
        """Random parameters: the mixer's ``init_layer`` per layer (stacked), unit norms, embedding
        N(0, ``embedding_std``²). One compiled program (an op-by-op init of a large mixer takes seconds)."""
        return _init(self, key, jnp.dtype(dtype))

    def init_cache(self, batch: int, dtype=jnp.float32) -> RecurrentCache:
        """Zero cache, layers stacked; the state is float32 (float64 for float64 params, for oracle tests)."""
        return RecurrentCache.zeros(
            self.mixer.recurrence(self.cfg), batch=batch, kernel_size=self.cfg.conv_kernel,
            conv_channels=conv_spec(self.mixer, self.cfg), num_layers=self.cfg.n_layer, conv_dtype=dtype,
            state_dtype=accumulation_dtype(dtype),
        )

    # ------------------------------------------------------------------ the stack
    def _check_tokens(self, tokens, ndim: int) -> None:
        if jnp.ndim(tokens) != ndim or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(f"tokens must be integer ids of {ndim} axes, got {jnp.result_type(tokens)} "
                             f"{jnp.shape(tokens)}")
        if not isinstance(tokens, jax.core.Tracer) and jnp.size(tokens):
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for the vocabulary of "
                                 f"{self.cfg.vocab_size}")

    def _stack(self, params: LMParams, x, cache, *, mode: str, remat: str = "none", segment_ids=None,
               lengths=None):
        def layer(lp: LayerParams, res, c):
            h = res if lp.norm is None else rms_norm(res, lp.norm, eps=self.cfg.norm_eps)
            out, c = run_layer(self.mixer, self.cfg, lp.mixer, h, c, mode=mode, segment_ids=segment_ids,
                               lengths=lengths)
            return res + out, c

        res, cache = scan_layers(layer, params.layers, x, cache, remat=remat)
        return rms_norm(res, params.norm_f, eps=self.cfg.norm_eps), cache

    def hidden(self, params: LMParams, tokens: Tokens, *, segment_ids: SegmentIds | None = None,
               remat: str = "none") -> jax.Array:
        """The final normed hidden states (batch, seq, d_model) from a zero cache."""
        self._check_tokens(tokens, 2)
        cache = self.init_cache(tokens.shape[0], params.embedding.dtype)
        return self._stack(params, params.embedding[tokens], cache, mode="sequence", remat=remat,
                           segment_ids=segment_ids)[0]

    def forward(self, params: LMParams, tokens: Tokens) -> SeqLogits:
        """Logits (batch, seq, vocab) at every position, from a zero cache."""
        return self.hidden(params, tokens) @ params.embedding.T

    def loss(self, params: LMParams, tokens: Tokens, *, segment_ids: SegmentIds | None = None,
             loss_mask=None, remat: str = "none") -> tuple[jax.Array, LossMetrics]:
        """Next-token cross-entropy ``(loss, ssdkit.LossMetrics)`` (blockwise head); ``segment_ids`` packs
        documents in a row (every conv and the state reset at each change of id)."""
        targets, weights = next_token_targets(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
        h = self.hidden(params, tokens, segment_ids=segment_ids, remat=remat)
        metrics = head_cross_entropy(h[:, :-1], params.embedding, targets, weights).metrics()
        return metrics.loss, metrics

    def score_window(self, params: LMParams, tokens: Tokens, targets: Tokens, weights: jax.Array,
                     cache: RecurrentCache, *, segment_ids: SegmentIds | None = None,
                     reset: jax.Array | None = None) -> tuple[CrossEntropySums, RecurrentCache]:
        """Cross-entropy sums of one window of a stream, continuing from ``cache``: ``(sums, new cache)``
        (compiled once per shape; ``ssdkit eval`` reads any length of text this way).

        Position t of ``tokens`` (batch, seq) predicts ``targets[:, t]`` with weight ``weights[:, t]`` (0 to
        skip; the caller gives the next window's first token as the last target, so a stream cut into windows
        scores every token once: exact for a recurrence, no overlap). ``segment_ids`` packs several documents
        in a row (every conv window and the state reset at each change of id; the cache continues the first
        one), ``reset`` (batch,) bool starts a row afresh (its cache zeroed) at this window's first token.
        Positions after a row's end may hold anything in range with weight 0: they only spoil that row's
        returned cache."""
        self._check_tokens(tokens, 2)
        self._check_tokens(targets, 2)
        batch, seq = np.shape(tokens)
        for name, a in (("targets", targets), ("weights", weights)) + (
                (("segment_ids", segment_ids),) if segment_ids is not None else ()):
            if np.shape(a) != (batch, seq):
                raise ValueError(f"{name} must have the shape of tokens {(batch, seq)}, got {np.shape(a)}")
        want = jax.eval_shape(functools.partial(self.init_cache, batch))
        if jax.tree_util.tree_structure(cache) != jax.tree_util.tree_structure(want) or any(
                np.shape(a) != b.shape for a, b in zip(jax.tree_util.tree_leaves(cache),
                                                       jax.tree_util.tree_leaves(want), strict=True)):
            raise ValueError(f"cache must be this model's cache for {batch} rows (MixerLM.init_cache({batch}))")
        reset = jnp.zeros((batch,), bool) if reset is None else jnp.asarray(reset, bool)
        if reset.shape != (batch,):
            raise ValueError(f"reset must have shape ({batch},), got {reset.shape}")
        return _score_window(self, params, tokens, targets, jnp.asarray(weights, jnp.float32), segment_ids, reset,
                             cache)

    # ------------------------------------------------------------------ generation
    def prefill(self, params: LMParams, tokens: Tokens, cache: RecurrentCache | None = None,
                lengths: Lengths | None = None) -> tuple[Logits, RecurrentCache]:
        """``(last_logits (batch, vocab), cache)``, continuing from ``cache`` if given. With ``lengths``
        (batch,) each row's prompt is its first ``lengths[b]`` tokens (the rest is padding, which leaves the
        cache as it was after the prompt) and its logits are those after token ``lengths[b] - 1``."""
        self._check_tokens(tokens, 2)
        cache = self.init_cache(tokens.shape[0], params.embedding.dtype) if cache is None else cache
        h, cache = self._stack(params, params.embedding[tokens], cache, mode="sequence", lengths=lengths)
        if lengths is None:
            last = h[:, -1]
        else:
            last = jnp.take_along_axis(h, (jnp.asarray(lengths) - 1)[:, None, None], axis=1)[:, 0]
        return last @ params.embedding.T, cache

    def decode(self, params: LMParams, token: StepTokens, cache: RecurrentCache) -> tuple[Logits, RecurrentCache]:
        """One token per row: ``(logits (batch, vocab), cache)``."""
        self._check_tokens(token, 1)
        h, cache = self._stack(params, params.embedding[token], cache, mode="step")
        return h @ params.embedding.T, cache

    def verify(self, params: LMParams, tokens: Tokens, cache: RecurrentCache) -> tuple[SeqLogits, LayerRecord]:
        """``tokens`` (batch, k) from ``cache`` in one pass: the logits after each (batch, k, vocab) and a
        record for :meth:`commit` (per layer: conv windows and inputs, the scan's record)."""
        self._check_tokens(tokens, 2)
        h, record = self._stack(params, params.embedding[tokens], cache, mode="verify")
        return h @ params.embedding.T, record

    def commit(self, record: Any, accepted: Lengths) -> RecurrentCache:
        """The cache after the first ``accepted[b]`` (0..k) of the verified tokens of each row."""
        if isinstance(record, tuple):
            return tuple(commit_layer(r, accepted) for r in record)
        return jax.vmap(commit_layer, in_axes=(0, None))(record, accepted)

    # ------------------------------------------------------------------ meshes
    def check_mesh(self, mesh) -> None:
        """Raise unless the mesh's ``model`` axis divides the recurrence's heads (tensor parallelism splits
        by head)."""
        m, heads = dict(mesh.shape).get("model", 1), self.mixer.recurrence(self.cfg).num_heads
        if heads % m:
            raise ValueError(f"the mesh's 'model' axis of {m} devices does not divide the {heads} heads of "
                             f"{type(self.mixer).__name__} (tensor parallelism splits by head)")

    def param_specs(self, params: LMParams, mesh) -> LMParams:
        """``PartitionSpec`` s for ``params`` (either layer layout) on ``mesh``, for any mixer:

        * embedding: ``fsdp`` over its largest divisible axis (:func:`ssdkit.sharding.fsdp_spec`);
        * norms: replicated;
        * the mixer's arrays: split by head over ``model`` on the axis its ``head_axes(cfg)`` names (when the
          mixer defines it and the axis divides), and ``fsdp`` over their largest other divisible axis;
          replicated over ``model`` otherwise (correct for any mixer, the compiler moves what it needs).
        """
        from ssdkit.sharding import fsdp_spec

        self.check_mesh(mesh)
        m = dict(mesh.shape).get("model", 1)
        stacked = not is_per_layer(params.layers)
        lead = 1 if stacked else 0
        example = params.layers.mixer if stacked else params.layers[0].mixer
        head_axes = getattr(self.mixer, "head_axes", None)
        axes = head_axes(self.cfg) if head_axes is not None else jax.tree_util.tree_map(lambda _: None, example)

        def spec(leaf, axis):
            shape = np.shape(leaf)
            if m == 1 or axis is None or shape[lead + axis] % m:
                return fsdp_spec(shape, mesh, leading=lead)
            parts = list(fsdp_spec(shape, mesh, leading=lead, exclude=(lead + axis,)))
            parts[lead + axis] = "model"
            return P(*parts)

        def layer_specs(lp: LayerParams) -> LayerParams:
            mixer = jax.tree_util.tree_map(spec, lp.mixer, axes, is_leaf=lambda x: x is None)
            return LayerParams(norm=None if lp.norm is None else P(), mixer=mixer)

        layers = layer_specs(params.layers) if stacked else tuple(layer_specs(lp) for lp in params.layers)
        return LMParams(embedding=fsdp_spec(params.embedding.shape, mesh), layers=layers, norm_f=P())


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(model: MixerLM, key: jax.Array, dtype) -> LMParams:
    cfg = model.cfg
    k_emb, k_layers = jax.random.split(key)
    mixers = jax.vmap(lambda k: model.mixer.init_layer(cfg, k))(jax.random.split(k_layers, cfg.n_layer))
    norm = jnp.ones((cfg.n_layer, cfg.d_model)) if model.pre_norm else None
    layers = jax.tree_util.tree_map(lambda a: a.astype(dtype), LayerParams(norm=norm, mixer=mixers))
    emb = cfg.embedding_std * jax.random.normal(k_emb, (cfg.vocab_size, cfg.d_model), dtype)
    return LMParams(embedding=emb, layers=layers, norm_f=jnp.ones((cfg.d_model,), dtype))


@functools.partial(inference_jit, static_argnames=("model",))
def _score_window(model: MixerLM, params, tokens, targets, weights, segment_ids, reset, cache):
    """:meth:`MixerLM.score_window`'s program: the rows marked ``reset`` start from a zero cache."""
    keep = lambda a: jnp.where(jnp.reshape(~reset, (1, -1) + (1,) * (a.ndim - 2)), a, jnp.zeros_like(a))  # noqa: E731
    cache = jax.tree_util.tree_map(keep, cache)
    h, cache = model._stack(params, params.embedding[tokens], cache, mode="sequence", segment_ids=segment_ids)
    return head_cross_entropy(h, params.embedding, targets, weights), cache

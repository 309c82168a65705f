"""Mamba-2: wiring only. All recurrence math (scan, step, conv, norms, cache) comes from ``ssdkit``.

Per layer (residual stream kept in float32)::

    h            = RMSNorm(residual) · norm                      (compute dtype)
    z, x         = h @ in_proj_headsᵀ                            per head: (P, P)
    dt           = h @ in_proj_dtᵀ                               per head
    B, C         = h @ in_proj_groupsᵀ                           per group: (N, N)
    x, B, C      = silu(causal_conv1d(x)), silu(causal_conv1d(B, C))   (windows carried in the cache)
    dt           = clamp(softplus(dt + dt_bias), dt_limit)       float32
    y            = SSD(x·dt, log_a = dt·A, B, C) + D·x           A = -exp(A_log); state in float32
    residual    += (gated_rms_norm(y, z) @ out_projᵀ)

then ``norm_f`` and the LM head (tied to the embedding unless ``lm_head`` is given). Padding is exact:
positions past a row's length get ``dt = 0`` (identity steps of the recurrence) and the conv window is
taken at each row's last real token, so a padded batch equals each row run alone.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

import ssdkit
from ssdkit import Recurrence, RecurrentCache
from ssdkit._typing import Lengths, Logits, Mask, SegmentIds, SeqLogits, StepTokens, Tokens
from ssdkit.core.layers import is_per_layer, unstack
from ssdkit.core.mesh import unsplit_sequence
from ssdkit.core.rollback import check_accepted
from ssdkit.dtypes import check_integer, check_lengths, is_concrete, readable, sequence_einsum
from ssdkit.inference import loop as generation_loop
from ssdkit.models.mamba2 import sharding as mamba2_sharding
from ssdkit.models.mamba2.config import Mamba2Config
from ssdkit.models.mamba2.params import Mamba2LayerParams, Mamba2Params
from ssdkit.sharding import gather_weights
from ssdkit.training.loss import DEFAULT_BLOCK_SIZE
from ssdkit.xla_options import inference_jit

Hidden = Float[Array, "batch seq d_model"]


def recurrence(cfg: Mamba2Config) -> Recurrence:
    """The SSD recurrence of one Mamba-2 layer: scalar decay per head."""
    return Recurrence(
        num_heads=cfg.nheads, head_dim=cfg.headdim, state_dim=cfg.d_state, num_groups=cfg.ngroups,
        decay="scalar", chunk_size=cfg.chunk_size,
    )


def init_cache(cfg: Mamba2Config, batch: int, dtype=jnp.float32) -> RecurrentCache:
    """Zero cache for ``batch`` rows: conv windows, a pair (x's (L, batch, d_conv-1, H·P), B and C's
    (L, batch, d_conv-1, G·2N)), in ``dtype``, and recurrent states (L, batch, H, P, N) in float32 (float64
    for float64 weights, in oracle tests)."""
    return RecurrentCache.zeros(
        recurrence(cfg), batch=batch, kernel_size=cfg.d_conv,
        conv_channels=(cfg.d_inner, 2 * cfg.ngroups * cfg.d_state),
        num_layers=cfg.n_layer, conv_dtype=dtype, state_dtype=ssdkit.accumulation_dtype(dtype),
    )


def compute_dtype(params: Mamba2Params) -> jnp.dtype:
    """The dtype of the projection weights, in which activations are computed."""
    return params.embedding.dtype


# ------------------------------------------------------------------------------ one layer
def _project(x, w, spec: str, sequence: bool):
    """``einsum(spec, x, w)`` accumulated in float32; a whole sequence may multiply in a wider dtype
    (``ssdkit.dtypes.sequence_einsum``), one token always in the weights' own."""
    if sequence:
        return sequence_einsum(spec, x, w)
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def _in_proj(cfg: Mamba2Config, lp: Mamba2LayerParams, residual, sequence: bool):
    """Pre-norm and input projections, in the compute dtype: z, x (.., H, P) and dt_raw (.., H) from the
    per-head rows, bc (.., G·2N) (group-major, B then C per group) from the per-group rows."""
    dtype = lp.in_proj_heads.dtype
    h = ssdkit.rms_norm(residual, lp.norm, eps=cfg.norm_eps).astype(dtype)
    # Each weight as the 2-D (rows, d_model) matrix it is in memory (a free reshape): XLA's CPU backend then
    # multiplies it in place, where a 3-D contraction had it transpose the weight on every decode step.
    d = lp.in_proj_heads.shape[-1]
    zx = _project(h, lp.in_proj_heads.reshape(-1, d), "...d,ed->...e", sequence).astype(dtype)
    dt = _project(h, lp.in_proj_dt, "...d,ed->...e", sequence).astype(dtype)  # (.., H)
    bc = _project(h, lp.in_proj_groups.reshape(-1, d), "...d,ed->...e", sequence).astype(dtype)  # (.., G·2N)
    p = cfg.headdim
    zx = zx.reshape(*zx.shape[:-1], cfg.nheads, 2 * p)
    return zx[..., :p], zx[..., p:], dt, bc


def _conv(cfg: Mamba2Config, lp: Mamba2LayerParams, x, bc, windows, step: bool, **options):
    """The short causal conv (then SiLU) of x (.., H, P) and of bc (.., G·2N), each with its own window;
    returns x (.., H, P), b, c (.., G, N) and the new windows. Depthwise, so two convs over the two channel
    sets equal the published one over [x | B | C]."""
    lead = x.shape[:-2]

    def conv(inputs, weight, bias, window):
        if step:  # one token: no lengths or documents to respect
            return ssdkit.causal_conv1d_step(inputs, weight, bias, window)
        return ssdkit.causal_conv1d(inputs, weight, bias, window=window, **options)

    x, wx = conv(x.reshape(*lead, cfg.d_inner), lp.conv_x_weight, lp.conv_x_bias, windows[0])
    bc, wbc = conv(bc, lp.conv_bc_weight, lp.conv_bc_bias, windows[1])
    x = jax.nn.silu(x).reshape(*lead, cfg.nheads, cfg.headdim)
    bc = jax.nn.silu(bc).reshape(*lead, cfg.ngroups, 2, cfg.d_state)
    return x, bc[..., 0, :], bc[..., 1, :], (wx, wbc)


def _ssm_inputs(cfg: Mamba2Config, lp: Mamba2LayerParams, x, dt_raw, valid=None):
    """Discretise: dt·x (.., H, P) and log_a = dt·A (.., H)."""
    dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + lp.dt_bias)
    lo, hi = cfg.dt_limit
    if (lo, hi) != (0.0, float("inf")):
        dt = jnp.clip(dt, lo, hi)
    if valid is not None:  # padding: identity steps
        dt = jnp.where(valid[..., None], dt, 0.0)
    a = -jnp.exp(lp.A_log.astype(jnp.float32))
    log_a = dt * a
    x_dt = (x.astype(jnp.float32) * dt[..., None]).astype(x.dtype)
    return x_dt, log_a


def _mixer_inputs(cfg: Mamba2Config, lp: Mamba2LayerParams, residual, windows, *, step: bool, lengths=None,
                  segment_ids=None):
    """Everything a layer computes before the recurrence, for one token (``step``) or a sequence:
    ``(z, x, x_dt, log_a, b, c, new conv windows, conv inputs)`` (the conv inputs flat: x's (.., H·P), B
    and C's (.., G·2N)). Positions past ``lengths`` become identity steps (dt = 0)."""
    z, x_in, dt_raw, bc_in = _in_proj(cfg, lp, residual, sequence=not step)
    x, b, c, windows = _conv(cfg, lp, x_in, bc_in, windows, step=step, lengths=lengths, segment_ids=segment_ids)
    valid = None if lengths is None else jnp.arange(residual.shape[1])[None, :] < lengths[:, None]
    x_dt, log_a = _ssm_inputs(cfg, lp, x, dt_raw, valid)
    return z, x, x_dt, log_a, b, c, windows, (x_in.reshape(*x_in.shape[:-2], cfg.d_inner), bc_in)


def _out_proj(cfg: Mamba2Config, lp: Mamba2LayerParams, x, y, z, sequence: bool):
    """D skip, gated group RMSNorm and output projection; returns float32 (.., d_model)."""
    y = y.astype(jnp.float32) + lp.D[:, None] * x.astype(jnp.float32)
    y = y.reshape(*y.shape[:-2], cfg.d_inner).astype(z.dtype)
    z = z.reshape(*z.shape[:-2], cfg.d_inner)
    y = ssdkit.gated_rms_norm(y, z, lp.gate_norm, num_groups=cfg.ngroups, eps=cfg.norm_eps)
    return _project(y, lp.out_proj, "...e,de->...d", sequence)


def _gather(cfg: Mamba2Config, lp: Mamba2LayerParams) -> Mamba2LayerParams:
    """FSDP's per-layer gather (``ssdkit.sharding.gather_weights``), keeping each weight's split by head over
    the mesh's ``model`` axis (``ssdkit.models.mamba2.sharding``); the identity off a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return lp
    return gather_weights(lp, mamba2_sharding.layer_model_specs(cfg, mesh, stacked=False))


def _layer_seq(cfg: Mamba2Config, lp: Mamba2LayerParams, residual, cache: RecurrentCache, lengths,
               segment_ids=None):
    """One layer over a sequence, continuing from ``cache``; returns (residual, new cache).

    ``segment_ids`` (batch, seq) packs documents: the conv taps and the recurrent state never cross a
    change of id (the cache continues the row's first document)."""
    lp = _gather(cfg, lp)  # FSDP on a mesh: this layer's weights, whole but for their model split
    z, x, x_dt, log_a, b, c, windows, _ = _mixer_inputs(cfg, lp, residual, cache.conv, step=False,
                                                        lengths=lengths, segment_ids=segment_ids)
    chunk = ssdkit.preferred_chunk_size(cfg.chunk_size)  # the result does not depend on it, the speed does
    y, state = ssdkit.ssd_scan(x_dt, log_a, b, c, chunk_size=chunk, initial_state=cache.state,
                               segment_ids=segment_ids)
    residual = residual + _out_proj(cfg, lp, x, y, z, sequence=True)
    return residual, RecurrentCache(conv=windows, state=state)


def _layer_step(cfg: Mamba2Config, lp: Mamba2LayerParams, residual, cache: RecurrentCache):
    """One layer for one token: O(1) conv step and SSD step."""
    lp = _gather(cfg, lp)
    z, x, x_dt, log_a, b, c, windows, _ = _mixer_inputs(cfg, lp, residual, cache.conv, step=True)
    y, state = ssdkit.ssd_step(cache.state, x_dt, log_a, b, c)
    residual = residual + _out_proj(cfg, lp, x, y, z, sequence=False)
    return residual, RecurrentCache(conv=windows, state=state)


# ------------------------------------------------------------------------------ the stack
def _embed(params: Mamba2Params, tokens):
    return jnp.take(gather_weights(params.embedding), tokens, axis=0).astype(jnp.float32)


def _head_weight(params: Mamba2Params):
    return gather_weights(params.embedding if params.lm_head is None else params.lm_head)


def _logits(cfg: Mamba2Config, params: Mamba2Params, hidden, sequence: bool = False):
    """Final norm and LM head: float32 logits over the padded vocabulary (``sequence``: every position)."""
    w = _head_weight(params)
    h = ssdkit.rms_norm(hidden, params.norm_f, eps=cfg.norm_eps)
    return _project(h.astype(w.dtype), w, "...d,vd->...v", sequence), h


def _check_tokens(cfg: Mamba2Config, tokens, ndim: int, name: str = "tokens") -> None:
    check_integer(name, tokens)
    if np.ndim(tokens) != ndim:
        want = "(batch, seq)" if ndim == 2 else "(batch,)"
        raise ValueError(f"{name} must have shape {want}, got {np.shape(tokens)}")
    t = readable(tokens) if is_concrete(tokens) else np.zeros(0)
    if t.size:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.padded_vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"token id {bad} in {name} is out of range for a vocabulary of {cfg.padded_vocab_size} "
                f"(valid ids are 0..{cfg.padded_vocab_size - 1})"
            )


def _check_cache(cfg: Mamba2Config, cache: RecurrentCache, batch: int) -> None:
    if is_per_layer(cache):
        raise ValueError("pass the stacked cache (from prefill or init_cache), not a per-layer tuple")
    want_conv = tuple((cfg.n_layer, batch, cfg.d_conv - 1, c) for c in (cfg.d_inner, 2 * cfg.ngroups * cfg.d_state))
    want_state = (cfg.n_layer, batch, cfg.nheads, cfg.headdim, cfg.d_state)
    conv = cache.conv if isinstance(cache.conv, tuple) else (cache.conv,)
    got_conv = tuple(tuple(w.shape) for w in conv)
    if got_conv != want_conv or tuple(cache.state.shape) != want_state:
        raise ValueError(
            f"cache does not fit this model and batch: conv windows {got_conv} (expected {want_conv}), state "
            f"{tuple(cache.state.shape)} (expected {want_state}); make one with "
            f"ssdkit.models.mamba2.init_cache(cfg, batch)"
        )


@functools.partial(inference_jit, static_argnames=("cfg", "return_hidden"))
def _forward(params, cfg, tokens, return_hidden):
    hidden = _hidden(params, cfg, tokens, None)
    w = _head_weight(params)
    logits = _project(hidden.astype(w.dtype), w, "...d,vd->...v", sequence=True)
    return (logits, hidden) if return_hidden else logits


def forward(
    params: Mamba2Params, cfg: Mamba2Config, tokens: Tokens, *, return_hidden: bool = False
) -> SeqLogits | tuple[SeqLogits, Hidden]:
    """Logits at every position: (batch, seq, padded_vocab) float32.

    With ``return_hidden=True`` returns ``(logits, hidden)``, hidden the final normed hidden state
    (batch, seq, d_model) in float32.
    """
    _check_tokens(cfg, tokens, 2)
    return _forward(params, cfg, tokens, return_hidden)


def _hidden(params: Mamba2Params, cfg: Mamba2Config, tokens, segment_ids, remat: str = "none") -> Hidden:
    """The final normed hidden states (batch, seq, d_model), float32, from an empty cache."""
    residual = _embed(params, tokens)
    cache = init_cache(cfg, tokens.shape[0], compute_dtype(params))
    layer = functools.partial(_layer_seq, cfg, lengths=None, segment_ids=segment_ids)
    residual, _ = ssdkit.scan_layers(layer, params.layers, residual, cache, remat=remat)
    return ssdkit.rms_norm(residual, params.norm_f, eps=cfg.norm_eps)


def loss(
    params: Mamba2Params,
    cfg: Mamba2Config,
    tokens: Tokens,
    *,
    segment_ids: SegmentIds | None = None,
    loss_mask: Mask | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    remat: str = "none",
) -> tuple[Float[Array, ""], ssdkit.LossMetrics]:
    """Next-token cross-entropy: ``(loss, metrics)``, differentiable in ``params``; jit it (cfg static).

    ``loss`` is the token-weighted mean over targets ``tokens[:, 1:]`` of ``-log softmax(logits_t)[y]``
    (float32 log-softmax over the padded vocabulary, as mamba_ssm and transformers compute it), with
    ``metrics`` = ``LossMetrics(loss, accuracy, tokens)``. ``segment_ids`` (batch, seq) packs documents
    in a row: state and conv window reset at each change of id and no position predicts the next
    document's first token. ``loss_mask`` (batch, seq) selects which tokens count as targets (bool or
    float weights). The LM head and the cross-entropy run over blocks of ``block_size`` positions,
    recomputed in the backward pass (``ssdkit.head_cross_entropy``): no (batch, seq, vocab) logits.
    ``remat`` names what the backward pass keeps of each layer (``ssdkit.core.layers.REMAT_POLICIES``:
    "none", "layer", "matmuls").
    """
    _check_tokens(cfg, tokens, 2)
    if np.shape(tokens)[1] < 2:
        raise ValueError(f"tokens must hold at least 2 positions to predict a next token, got {np.shape(tokens)}")
    targets, weights = ssdkit.next_token_targets(tokens, segment_ids=segment_ids, loss_mask=loss_mask)
    hidden = _hidden(params, cfg, tokens, segment_ids, remat)[:, :-1]
    sums = ssdkit.head_cross_entropy(hidden, _head_weight(params), targets, weights, block_size=block_size)
    metrics = sums.metrics()
    return metrics.loss, metrics


@functools.partial(inference_jit, static_argnames=("cfg",))
def prefill_program(params, cfg, tokens, lengths, cache):
    """:func:`prefill` compiled, without its input checks (the benchmarks time it; ``cfg`` is static)."""
    batch, seq = tokens.shape
    if cache is None:
        cache = init_cache(cfg, batch, compute_dtype(params))
    residual = _embed(params, tokens)
    layer = functools.partial(_layer_seq, cfg, lengths=lengths)
    residual, cache = ssdkit.scan_layers(layer, params.layers, residual, cache)
    last = seq - 1 if lengths is None else lengths - 1
    last_hidden = residual[jnp.arange(batch), jnp.broadcast_to(last, (batch,))]
    logits, _ = _logits(cfg, params, last_hidden)
    return logits, cache


def prefill(
    params: Mamba2Params,
    cfg: Mamba2Config,
    tokens: Tokens,
    *,
    lengths: Lengths | None = None,
    cache: RecurrentCache | None = None,
) -> tuple[Logits, RecurrentCache]:
    """Run a prompt and return ``(last_logits (batch, padded_vocab), cache)``.

    Only the last real position goes through the LM head. ``lengths`` (batch,) gives each row's
    number of real tokens (right padding after them leaves state and conv window untouched).
    ``cache`` continues from an earlier prefill or decode (chunked prefill equals one-shot).
    """
    _check_tokens(cfg, tokens, 2)
    batch, seq = np.shape(tokens)
    if seq == 0:
        raise ValueError("tokens must hold at least one position")
    if lengths is not None:
        check_lengths("lengths", lengths, batch, seq)
    if cache is not None:
        _check_cache(cfg, cache, batch)
    return prefill_program(params, cfg, tokens, lengths, cache)


@functools.partial(inference_jit, static_argnames=("cfg",))
def _score_window(params, cfg, tokens, targets, weights, segment_ids, reset, cache):
    keep = ~reset
    cache = jax.tree_util.tree_map(lambda a: a * keep.reshape(1, -1, *([1] * (a.ndim - 2))).astype(a.dtype), cache)
    residual = _embed(params, tokens)
    layer = functools.partial(_layer_seq, cfg, lengths=None, segment_ids=segment_ids)
    residual, cache = ssdkit.scan_layers(layer, params.layers, residual, cache)
    hidden = ssdkit.rms_norm(residual, params.norm_f, eps=cfg.norm_eps)
    return ssdkit.head_cross_entropy(hidden, _head_weight(params), targets, weights), cache


def score_window(
    params: Mamba2Params,
    cfg: Mamba2Config,
    tokens: Tokens,
    targets: Tokens,
    weights: Float[Array, "batch seq"],
    cache: RecurrentCache,
    *,
    segment_ids: SegmentIds | None = None,
    reset: Bool[Array, " batch"] | None = None,
) -> tuple[ssdkit.CrossEntropySums, RecurrentCache]:
    """Cross-entropy sums of one window of a stream, continuing from ``cache``: ``(sums, new cache)``.

    Position t of ``tokens`` (batch, seq) predicts ``targets[:, t]`` with weight ``weights[:, t]`` (0 to
    skip; the caller gives the next window's first token as the last target, so a stream cut into
    windows scores every token once: exact for a recurrence, no overlap). ``segment_ids`` packs several
    documents in a row (state and conv window reset at each change; the cache continues the first one),
    ``reset`` (batch,) bool starts a row afresh (its cache zeroed) at this window's first token. Positions
    after a row's end may hold anything with weight 0: they only spoil that row's returned cache.
    """
    _check_tokens(cfg, tokens, 2)
    batch, seq = np.shape(tokens)
    for name, a in (("targets", targets), ("weights", weights)) + (
            (("segment_ids", segment_ids),) if segment_ids is not None else ()):
        if np.shape(a) != (batch, seq):
            raise ValueError(f"{name} must have the shape of tokens {(batch, seq)}, got {np.shape(a)}")
    _check_cache(cfg, cache, batch)
    reset = jnp.zeros((batch,), bool) if reset is None else jnp.asarray(reset, bool)
    if reset.shape != (batch,):
        raise ValueError(f"reset must have shape ({batch},), got {reset.shape}")
    return _score_window(params, cfg, tokens, targets, jnp.asarray(weights, jnp.float32), segment_ids, reset, cache)


def _decode(params, cfg, token, cache):
    residual = _embed(params, token)
    residual, cache = ssdkit.scan_layers(functools.partial(_layer_step, cfg), params.layers, residual, cache)
    logits, _ = _logits(cfg, params, residual)
    return logits, cache


_decode_step = inference_jit(_decode, static_argnames=("cfg",), donate_argnames=("cache",))


def decode_step(
    params: Mamba2Params, cfg: Mamba2Config, token: StepTokens, cache: RecurrentCache
) -> tuple[Logits, RecurrentCache]:
    """One token per row: ``(logits (batch, padded_vocab), new cache)``; O(1) in the sequence length.

    The cache buffers are donated: do not reuse the ``cache`` passed in. Per-layer params (the default of
    ``init_params`` and ``load_checkpoint``) are read in place; stacked ones are sliced per layer in every
    call (for many steps, :func:`generate` / :func:`generate_stream` split them once per call instead).
    """
    _check_tokens(cfg, token, 1, "token")
    _check_cache(cfg, cache, np.shape(token)[0])
    return _decode_step(params, cfg, token, cache)


# ------------------------------------------------------------------------------ verify k tokens, keep j
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyRecord:
    """What :func:`commit` needs of k verified tokens, per layer (stacked on a leading layer axis): the
    scan's record (the entering state and the k steps' x·dt, log_a, B), the conv windows before the k
    tokens and the k tokens' conv inputs (x's (L, batch, k, H·P); B and C's (L, batch, k, G·2N))."""

    scan: ssdkit.ScanRecord
    windows: tuple[jax.Array, jax.Array]
    conv_inputs: tuple[jax.Array, jax.Array]


def _layer_verify(cfg: Mamba2Config, lp: Mamba2LayerParams, residual, cache: RecurrentCache):
    lp = _gather(cfg, lp)
    z, x, x_dt, log_a, b, c, _, conv_inputs = _mixer_inputs(cfg, lp, residual, cache.conv, step=False)
    y, scan = ssdkit.ssd_verify(cache.state, x_dt, log_a, b, c)
    residual = residual + _out_proj(cfg, lp, x, y, z, sequence=True)
    return residual, VerifyRecord(scan=scan, windows=cache.conv, conv_inputs=conv_inputs)


@functools.partial(inference_jit, static_argnames=("cfg",))
def _verify(params, cfg, tokens, cache):
    with unsplit_sequence():  # k tokens: computed whole on every device of a mesh's seq axis (ssdkit.core.mesh)
        residual = _embed(params, tokens)
        residual, record = ssdkit.scan_layers(functools.partial(_layer_verify, cfg), params.layers, residual, cache)
        logits, _ = _logits(cfg, params, residual, sequence=True)
    return logits, record


def verify(
    params: Mamba2Params, cfg: Mamba2Config, tokens: Tokens, cache: RecurrentCache
) -> tuple[SeqLogits, VerifyRecord]:
    """k proposed tokens per row from ``cache`` in one pass: ``(logits (batch, k, padded_vocab), record)``.

    ``logits[:, t]`` are the logits after ``tokens[:, t]`` (what ``decode_step`` fed the same tokens one by
    one returns); ``cache`` is not changed. :func:`commit` then keeps any prefix of the k tokens, row by
    row, without a second pass (``ssdkit.core.rollback``).
    Under a mesh with a ``seq`` axis the k tokens are not split over it (any k works; each ``seq`` device
    computes them, ``ssdkit.core.mesh.unsplit_sequence``).
    """
    _check_tokens(cfg, tokens, 2)
    if np.shape(tokens)[1] < 1:
        raise ValueError(f"tokens must hold at least one token to verify per row, got {np.shape(tokens)}")
    _check_cache(cfg, cache, np.shape(tokens)[0])
    return _verify(params, cfg, tokens, cache)


def _commit_layers(record, accepted) -> RecurrentCache | tuple[RecurrentCache, ...]:
    """Commit a stacked record (every layer's rows in one merged commit) or a per-layer tuple of them."""
    if isinstance(record, (tuple, list)):  # per-layer weights give per-layer records, and a per-layer cache
        return tuple(_commit_layers(r, accepted) for r in record)
    stacked = record.scan.state.ndim == 5
    layers = record.scan.state.shape[0] if stacked else 1
    batch = record.scan.state.shape[1 if stacked else 0]

    def merge(a):  # (L, batch, ...) -> (L·batch, ...): one commit over every layer's rows at once
        return a.reshape(layers * batch, *a.shape[2:]) if stacked else a

    rows = jnp.tile(accepted, layers)
    scan = jax.tree_util.tree_map(merge, record.scan)
    state = ssdkit.ssd_commit(scan, rows).reshape(record.scan.state.shape)
    windows = tuple(ssdkit.conv_commit(merge(w), merge(i), rows).reshape(w.shape)
                    for w, i in zip(record.windows, record.conv_inputs, strict=True))
    return RecurrentCache(conv=windows, state=state)


_commit = inference_jit(_commit_layers)


def commit(record: VerifyRecord, accepted: Lengths) -> RecurrentCache:
    """The cache after the first ``accepted[i]`` (0..k) of the verified tokens of each row: equal to the
    cache :func:`prefill` (or ``decode_step``) gives after those tokens. O(k) per layer, no weights read."""
    first = record[0] if isinstance(record, (tuple, list)) else record
    batch, k = np.shape(first.conv_inputs[0])[-3:-1]
    check_accepted(accepted, batch, k)
    return _commit(record, jnp.asarray(accepted, jnp.int32))


# ------------------------------------------------------------------------------ generation
@dataclasses.dataclass(frozen=True)
class Mamba2LM:
    """Adapter giving ``ssdkit.generate`` the model protocol (hashable: a static jit argument)."""

    cfg: Mamba2Config

    def prepare(self, params):
        """Per-layer weights, which decode reads in place (``ssdkit.core.layers``): the generation loops call
        this once per call, inside the compiled program, so stacked params are split there (one copy of the
        layer weights for the call's duration) and never per step."""
        return params if is_per_layer(params.layers) else dataclasses.replace(params, layers=unstack(params.layers))

    def prefill(self, params, tokens, lengths=None, cache=None):
        logits, cache = prefill_program(params, self.cfg, tokens, lengths, cache)
        if is_per_layer(params.layers):  # decode then reads and writes every layer's cache in place
            cache = unstack(cache)
        return logits, cache

    def decode(self, params, token, cache):
        return _decode(params, self.cfg, token, cache)

    def verify(self, params, tokens, cache):
        return _verify(params, self.cfg, tokens, cache)

    def commit(self, record, accepted):
        return _commit_layers(record, accepted)


def _generation_args(cfg, prompt_ids, lengths, temperature, top_k, top_p, key):
    """Validate a generation request; returns (sampler, key)."""
    _check_tokens(cfg, prompt_ids, 2, "prompt_ids")
    if lengths is not None:
        check_lengths("lengths", lengths, *np.shape(prompt_ids))
    sampler = ssdkit.make_sampler(temperature=temperature, top_k=top_k, top_p=top_p)
    if key is None and not isinstance(sampler, ssdkit.Greedy):
        key = jax.random.key(0)
    return sampler, key


def generate(
    params: Mamba2Params,
    cfg: Mamba2Config,
    prompt_ids: Tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    lengths: Lengths | None = None,
    key: jax.Array | None = None,
    speculative: ssdkit.Speculative | None = None,
    draft_params: Mamba2Params | None = None,
) -> ssdkit.GenerationResult:
    """Generate up to ``max_new_tokens`` per row in one compiled device call.

    Returns ``GenerationResult(tokens (batch, max_new_tokens) int32, lengths (batch,))``; a row stops
    after ``eos_token_id`` (counted in its length), later positions hold the pad id 0. Temperature 0 is
    greedy; otherwise sampling with optional top-k / top-p from ``key`` (default ``jax.random.key(0)``).
    ``speculative`` decodes speculatively (``ssdkit.Speculative``: prompt lookup, or a draft Mamba-2 as
    ``DraftModel(Mamba2LM(draft_cfg))`` with ``draft_params``); the result then has ``speculation`` stats.
    """
    return _generation_request(ssdkit.generate, params, cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p,
                               eos_token_id, lengths, key, speculative, draft_params)


def _generation_request(entry, params, cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                        lengths, key, speculative, draft_params):
    """``entry`` (``ssdkit.generate`` or ``lower_generate``) called with :func:`generate`'s request."""
    sampler, key = _generation_args(cfg, prompt_ids, lengths, temperature, top_k, top_p, key)
    return entry(
        Mamba2LM(cfg), params, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, key=key,
        eos_token_id=eos_token_id, prompt_lengths=lengths, speculative=speculative, draft_params=draft_params,
    )


def lower_generate(
    params: Mamba2Params,
    cfg: Mamba2Config,
    prompt_ids: Tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    lengths: Lengths | None = None,
    key: jax.Array | None = None,
    speculative: ssdkit.Speculative | None = None,
    draft_params: Mamba2Params | None = None,
) -> generation_loop.LoweredGeneration:
    """The program :func:`generate` runs for this request (same arguments), lowered ahead of time: compile it,
    then run it once (``ssdkit.inference.loop.lower_generate``)::

        compiled = mamba2.lower_generate(params, cfg, prompt_ids, max_new_tokens=64).compile()
        out = compiled()   # what mamba2.generate(params, cfg, prompt_ids, max_new_tokens=64) returns
    """
    return _generation_request(generation_loop.lower_generate, params, cfg, prompt_ids, max_new_tokens, temperature,
                               top_k, top_p, eos_token_id, lengths, key, speculative, draft_params)


def generate_stream(
    params: Mamba2Params,
    cfg: Mamba2Config,
    prompt_ids: Tokens,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    lengths: Lengths | None = None,
    key: jax.Array | None = None,
):
    """Like :func:`generate`, but yields each step's (batch,) tokens as soon as they exist."""
    sampler, key = _generation_args(cfg, prompt_ids, lengths, temperature, top_k, top_p, key)
    yield from ssdkit.generate_stream(
        Mamba2LM(cfg), params, prompt_ids, max_new_tokens=max_new_tokens, sampler=sampler, key=key,
        eos_token_id=eos_token_id, prompt_lengths=lengths,
    )

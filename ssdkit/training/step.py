"""A generic training step for any model with ``loss(params, batch) -> (loss, LossMetrics)``.

One jitted step with the train state donated::

    g      = Σ_i n_i · ∇ loss_i / Σ_i n_i          over micro-batches i (n_i: their target tokens)
    finite = isfinite(loss) ∧ isfinite(‖g‖)     (one reduction: any NaN or Inf in g makes ‖g‖ non-finite)
    params, opt_state = optimizer(g) if finite else unchanged     (a lax.cond; skipped += ¬finite)
    params_finite = isfinite(Σ params · 0)     (a finite gradient with a non-finite learning rate: stop)

Weights and optimiser state stay in float32 (master weights); ``compute_dtype`` casts the weight
matrices (floating leaves with two or more axes) for the forward and backward pass only, so gradients
arrive in float32. Vectors — norms, biases, decays such as ``A_log``, ``dt_bias``, ``D`` — stay float32,
and the recurrent state is float32 in the core whatever the weights. Per-layer rematerialisation is the
model's (``ssdkit.scan_layers(..., remat=...)``, e.g. ``mamba2.loss(..., remat="layer")``).

:func:`adamw` gives the default optimiser: AdamW, linear warm-up then cosine decay, global-norm
clipping, and weight decay only on weight matrices (not norms, biases, ``A_log``, ``dt_bias``, ``D``,
nor the embedding: mamba_ssm's convention).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jaxtyping import Array, Int

from ssdkit.training.loss import LossMetrics
from ssdkit.xla_options import training_compiler_options

LossFn = Callable[[Any, Any], tuple[jax.Array, LossMetrics]]

#: Path components (attribute or key names) whose leaves are never weight-decayed.
NO_DECAY_NAMES = frozenset({"embedding", "embeddings", "A_log", "dt_bias", "D"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a step updates: a PyTree (donated to the step, saved by checkpoints)."""

    step: Int[Array, ""]  # optimiser steps taken (skipped ones included)
    params: Any  # float32 master weights
    opt_state: Any
    skipped: Int[Array, ""]  # steps whose loss or gradient was not finite (no update applied)

    @classmethod
    def create(cls, params, optimizer: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   skipped=jnp.zeros((), jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """One step's report (float32 / int32 scalars)."""

    loss: jax.Array  # token-weighted mean over the whole batch
    accuracy: jax.Array
    tokens: jax.Array  # target tokens in the batch
    grad_norm: jax.Array  # global L2 norm of the (unclipped) gradient
    finite: jax.Array  # bool: whether the update was applied
    params_finite: jax.Array  # bool: whether every weight is finite after the step (False: stop, restore a checkpoint)


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        for attr in ("name", "key"):
            if isinstance(getattr(k, attr, None), str):
                names.append(getattr(k, attr))
    return names


def decay_mask(params) -> Any:
    """True for leaves that get weight decay: floating arrays with two or more axes whose path names no
    embedding, norm, bias or decay parameter (:data:`NO_DECAY_NAMES`, or a name containing "norm" or
    "bias")."""

    def decays(path, leaf) -> bool:
        names = _path_names(path)
        if any(n in NO_DECAY_NAMES or "norm" in n.lower() or "bias" in n.lower() for n in names):
            return False
        return jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and np.ndim(leaf) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def warmup_cosine(learning_rate: float, *, warmup_steps: int, total_steps: int,
                  min_ratio: float = 0.1) -> optax.Schedule:
    """Linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``min_ratio · learning_rate`` at ``total_steps`` (constant after)."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=min_ratio * learning_rate,
    )


def adamw(
    learning_rate: float | optax.Schedule = 3e-4,
    *,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.1,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    mask: Callable[[Any], Any] | None = decay_mask,
) -> optax.GradientTransformation:
    """The default optimiser: global-norm clipping, then AdamW with a warm-up + cosine schedule.

    ``learning_rate`` is the peak rate (a float, scheduled by :func:`warmup_cosine` when ``total_steps``
    is given) or any optax schedule. ``mask`` selects the leaves that get weight decay (default
    :func:`decay_mask`; None decays every leaf). Every knob is a keyword; a non-finite or out-of-range
    number is refused (ValueError naming it).
    """
    def check(name, value, ok, want):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or not ok(value):
            raise ValueError(f"adamw: {name} must be a finite number {want}, got {value!r}")

    if not callable(learning_rate):
        check("learning_rate", learning_rate, lambda v: v > 0, "> 0")
    check("min_lr_ratio", min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
    check("b1", b1, lambda v: 0 <= v < 1, "in [0, 1)")
    check("b2", b2, lambda v: 0 <= v < 1, "in [0, 1)")
    check("eps", eps, lambda v: v > 0, "> 0")
    check("weight_decay", weight_decay, lambda v: v >= 0, ">= 0")
    if clip_norm is not None:
        check("clip_norm", clip_norm, lambda v: v > 0, "> 0 (or None: no clipping)")
    schedule = learning_rate
    if total_steps is not None and not callable(learning_rate):
        schedule = warmup_cosine(learning_rate, warmup_steps=warmup_steps, total_steps=total_steps,
                                 min_ratio=min_lr_ratio)
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=mask))
    return optax.chain(*parts)


#: Path components of vectors that keep float32 under a compute dtype, whatever their number of axes (a
#: stack of layers gives each layer's vector a second one); names holding "norm" or "bias" too.
FLOAT32_NAMES = frozenset({"A_log", "dt_bias", "D"})


def cast_matrices(params, dtype) -> Any:
    """Weight matrices cast to ``dtype``: floating leaves with two or more axes, except norms, biases and
    decays (a path name in :data:`FLOAT32_NAMES` or holding "norm" or "bias"), which stay as they are in
    either layout, per layer or stacked."""

    def cast(path, leaf):
        names = _path_names(path)
        if any(n in FLOAT32_NAMES or "norm" in n.lower() or "bias" in n.lower() for n in names):
            return leaf
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) and np.ndim(leaf) >= 2:
            return leaf.astype(dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(cast, params)


def _split_micro(batch, micro_batches: int):
    def split(leaf):
        n = np.shape(leaf)[0]
        if n % micro_batches:
            raise ValueError(f"batch of {n} rows does not split into {micro_batches} micro-batches")
        return leaf.reshape(micro_batches, n // micro_batches, *np.shape(leaf)[1:])

    return jax.tree_util.tree_map(split, batch)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    micro_batches: int = 1,
    compute_dtype=None,
    shardings: tuple[Any, Any] | None = None,
) -> Callable[[TrainState, Any], tuple[TrainState, StepMetrics]]:
    """A jitted ``step(state, batch) -> (state, StepMetrics)``; ``state`` is donated (do not reuse it).

    ``loss_fn(params, batch) -> (loss, LossMetrics)`` is any model's token-weighted mean loss (close over
    static things such as a config with ``functools.partial``). ``batch`` is a PyTree whose leaves share
    a leading batch axis; ``micro_batches`` splits it and accumulates the gradient (weighted by each
    micro-batch's token count, so the result equals one pass over the whole batch up to rounding) in
    float32 inside one ``lax.scan``. ``compute_dtype`` (e.g. ``jnp.bfloat16``) runs the model on
    :func:`cast_matrices` of the float32 master weights. ``shardings`` = ``(state, batch)``: PyTrees (or
    prefixes) of ``NamedSharding`` s on a mesh (``ssdkit.sharding``) that the step takes its inputs in and
    gives the new state back in (so parameters and optimiser state stay sharded from step to step); the
    compiler inserts the collectives.
    """
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")

    def compute_loss(params, batch):
        run = params if compute_dtype is None else cast_matrices(params, compute_dtype)
        loss, metrics = loss_fn(run, batch)
        if not isinstance(metrics, LossMetrics):
            raise TypeError(f"loss_fn must return (loss, ssdkit.LossMetrics), got metrics {type(metrics).__name__}")
        return loss * metrics.tokens, metrics  # the token-weighted sum: micro-batches add up exactly

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    def step(state: TrainState, batch) -> tuple[TrainState, StepMetrics]:
        if micro_batches == 1:
            (nll, metrics), grads = grad_fn(state.params, batch)
            correct, tokens = metrics.accuracy * metrics.tokens, metrics.tokens
        else:
            def body(acc, micro):
                g_acc, nll_acc, correct_acc, tok_acc = acc
                (nll, m), g = grad_fn(state.params, micro)
                g_acc = jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, nll_acc + nll, correct_acc + m.accuracy * m.tokens, tok_acc + m.tokens), None

            zero = jnp.zeros((), jnp.float32)
            zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
            (grads, nll, correct, tokens), _ = lax.scan(body, (zeros, zero, zero, zero),
                                                        _split_micro(batch, micro_batches))
        denom = jnp.maximum(tokens, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g.astype(jnp.float32) / denom, grads)
        loss = nll / denom
        grad_norm = optax.tree.norm(grads)
        # One reduction decides: a NaN or Inf anywhere makes the norm non-finite (as does a gradient whose
        # norm overflows float32, which no update should follow either).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params_opt):
            updates, opt_state = optimizer.update(grads, params_opt[1], params_opt[0])
            params = optax.apply_updates(params_opt[0], updates)
            # finite gradients can still give a non-finite update (a learning rate that a schedule made NaN
            # or Inf): Σ p·0 is NaN exactly when some new weight is (no overflow), and the reduction rides
            # on the update's own pass
            return params, opt_state, jnp.isfinite(optax.tree.sum(jax.tree_util.tree_map(lambda p: p * 0, params)))

        # a conditional, not a select: a skipped step leaves the donated buffers as they were, and a
        # taken one costs no extra pass over the parameters and optimiser state
        params, opt_state, params_finite = lax.cond(
            finite, update, lambda params_opt: (*params_opt, jnp.bool_(True)), (state.params, state.opt_state))
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               skipped=state.skipped + (~finite).astype(jnp.int32))
        metrics = StepMetrics(loss=loss, accuracy=correct / denom, tokens=tokens, grad_norm=grad_norm, finite=finite,
                              params_finite=params_finite)
        return new_state, metrics

    if shardings is None:
        return jax.jit(step, donate_argnums=0, compiler_options=training_compiler_options())
    state_sharding, batch_sharding = shardings
    mesh = jax.tree_util.tree_leaves(state_sharding)[0].mesh
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step_on_mesh(state, batch):  # traced under the mesh: a model's ssdkit.sharding.gather_weights sees it
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, batch)

    return jax.jit(step_on_mesh, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, replicated), compiler_options=training_compiler_options())

"""Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule"; Qwen3-Next's
linear-attention layers) as a mixer: flash-linear-attention 0.6.0's ``fla.layers.GatedDeltaNet`` with its
defaults.

Per token (``h`` the layer's normed input; G query/key heads of N channels, H value heads of P, value head h
reading q/k head ``h // (H / G)``)::

    q, k, v = silu(conv_q(h W_q)), silu(conv_k(h W_k)), silu(conv_v(h W_v))      short causal convs
    q, k    = q / ‖q‖, k / ‖k‖                                                    per head (L2, eps 1e-6)
    β       = sigmoid(h W_β)                                                      per value head
    g       = -exp(A_log) · softplus(h W_a + dt_bias),   α = exp(g) ∈ (0, 1)      per value head (Mamba-2's)
    H_t     = α_t (I - β_t k_t k_tᵀ) H_{t-1} + β_t k_t v_tᵀ                       (N, P) state per head
    o_t     = H_tᵀ q_t · N^-1/2
    out     = concat_h(RMSNorm_P(o_t) ⊙ silu(h W_g)_h) W_o                        gated norm per head

ssdkit's state is ``Hᵀ`` (P, N); :func:`ssdkit.delta_rule` maps q, k, v, β, g to the scan's rank-one inputs
(``log_a = g``, ``w = -α β k``, ``u = k``, ``b = β k``, ``x = v``, ``c = q N^-1/2``; a scalar α per head
commutes with the delta step, so fla's decay-first order is the same recurrence). The layer computes those
inputs and calls ``ops.conv`` (three convs) and ``ops.scan`` once.

fla 0.6.0's arguments and how they map (defaults followed unless said):

* ``hidden_size`` = ``cfg.d_model``; ``num_heads`` (q/k heads) = ``cfg.num_groups`` (G);
  ``num_v_heads`` = ``cfg.num_heads`` (H; fla's default ``num_v_heads = num_heads`` is G = H, fewer groups
  are fla's GVA with the same head mapping); ``head_dim`` = ``cfg.state_dim`` (N);
  ``head_v_dim = head_dim · expand_v`` = ``cfg.head_dim`` (P, set directly; fla's default expand_v is 2).
* ``use_short_conv=True``, ``conv_size`` = ``cfg.conv_kernel``, ``conv_bias=False``, SiLU after each conv.
* ``a_proj``, ``b_proj`` (no bias), ``A_log``, ``dt_bias``: the gate and β computed in-kernel in fla
  (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``, ``use_qk_l2norm_in_kernel``); here in the layer.
  ``allow_neg_eigval`` = :attr:`GatedDeltaNet.allow_neg_eigval`.
* ``use_gate=True``, ``output_gate_activation='swish'``: ``g_proj`` and ``FusedRMSNormGated(head_v_dim)``,
  i.e. RMSNorm over each head's P channels (one weight (P,) shared by the heads), then times ``silu`` of the
  gate: normalise first, then gate (not :func:`ssdkit.gated_rms_norm`, Mamba-2's gate-then-normalise).
  eps ``cfg.norm_eps`` (fla's model configs pass ``norm_eps`` 1e-6, LMConfig's default).

Initialisation: ``A_log = log A``, A ~ U(0, 16] (fla: U[0, 16), 0 left out so that log A is finite);
``dt_bias = softplus⁻¹(dt)``, dt log-uniform in [0.001, 0.1] (fla's Mamba-2-style init, floor 1e-4 inert);
projections lecun-normal (as ssdkit's toy mixers; fla's model re-draws every linear as N(0, 0.02²)); conv
taps U(-1/√K, 1/√K); the norm's weight ones.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ssdkit
from ssdkit.models.delta.deltanet import Hidden, delta_recurrence, qkv, qkv_conv_channels, short_conv_init

#: The range of the decay rate's init, A = exp(A_log) ~ U(0, A_INIT_MAX] (fla's 16).
A_INIT_MAX = 16.0
#: The log-uniform range of the step dt at init, softplus(dt_bias) = dt (fla's, as Mamba-2's).
DT_INIT_RANGE = (0.001, 0.1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedDeltaNetLayer:
    """One Gated DeltaNet layer's arrays (fla's names in brackets; ``x @ w`` layout, fla's ``weight.T``).

    Attributes:
        wq, wk: (d_model, G·N) [q_proj, k_proj].
        wv: (d_model, H·P) [v_proj].
        wa: (d_model, H) [a_proj], the gate's input.
        w_beta: (d_model, H) [b_proj].
        A_log: (H,) [A_log], log of the decay rate A > 0.
        dt_bias: (H,) [dt_bias].
        conv_q, conv_k: (K, G·N), conv_v: (K, H·P), time-major taps [q_conv1d, k_conv1d, v_conv1d].
        wg: (d_model, H·P) [g_proj], the output gate.
        out_norm: (P,) the gated RMSNorm's weight, shared by the heads [o_norm].
        wo: (H·P, d_model) [o_proj].
    """

    wq: Float[Array, "d_model gn"]
    wk: Float[Array, "d_model gn"]
    wv: Float[Array, "d_model hp"]
    wa: Float[Array, "d_model heads"]
    w_beta: Float[Array, "d_model heads"]
    A_log: Float[Array, " heads"]
    dt_bias: Float[Array, " heads"]
    conv_q: Float[Array, "kernel gn"]
    conv_k: Float[Array, "kernel gn"]
    conv_v: Float[Array, "kernel hp"]
    wg: Float[Array, "d_model hp"]
    out_norm: Float[Array, " hdim"]
    wo: Float[Array, "hp d_model"]


def gate_init(key: jax.Array, heads: int) -> tuple[Float[Array, " heads"], Float[Array, " heads"]]:
    """``(A_log, dt_bias)`` as fla (Mamba-2) draws them (module docstring)."""
    ka, kd = jax.random.split(key)
    a = A_INIT_MAX * (1.0 - jax.random.uniform(ka, (heads,)))  # (0, A_INIT_MAX]
    lo, hi = DT_INIT_RANGE
    dt = jnp.exp(jax.random.uniform(kd, (heads,)) * (math.log(hi) - math.log(lo)) + math.log(lo))
    dt = jnp.maximum(dt, 1e-4)
    return jnp.log(a), dt + jnp.log(-jnp.expm1(-dt))  # softplus⁻¹(dt)


@dataclasses.dataclass(frozen=True)
class GatedDeltaNet:
    """The Gated DeltaNet layer (module docstring) as an :class:`ssdkit.Mixer`.

    Attributes:
        allow_neg_eigval: β = 2·sigmoid(·) ∈ (0, 2) (fla's option); False (fla's default): β ∈ (0, 1).
    """

    allow_neg_eigval: bool = False

    def recurrence(self, cfg) -> ssdkit.Recurrence:
        return delta_recurrence(cfg)

    def conv_channels(self, cfg) -> tuple[int, int, int]:
        """Three short convs, of q (G·N), k (G·N) and v (H·P) channels, in that order."""
        return qkv_conv_channels(cfg)

    def init_layer(self, cfg, key: jax.Array) -> GatedDeltaNetLayer:
        ks = jax.random.split(key, 11)
        d, h, gn, hp = cfg.d_model, cfg.num_heads, cfg.num_groups * cfg.state_dim, cfg.num_heads * cfg.head_dim
        init = jax.nn.initializers.lecun_normal()
        a_log, dt_bias = gate_init(ks[5], h)
        return GatedDeltaNetLayer(
            wq=init(ks[0], (d, gn)), wk=init(ks[1], (d, gn)), wv=init(ks[2], (d, hp)), wa=init(ks[3], (d, h)),
            w_beta=init(ks[4], (d, h)), A_log=a_log, dt_bias=dt_bias,
            conv_q=short_conv_init(ks[6], cfg.conv_kernel, gn), conv_k=short_conv_init(ks[7], cfg.conv_kernel, gn),
            conv_v=short_conv_init(ks[8], cfg.conv_kernel, hp), wg=init(ks[9], (d, hp)),
            out_norm=jnp.ones((cfg.head_dim,)), wo=init(ks[10], (hp, d)),
        )

    def head_axes(self, cfg) -> GatedDeltaNetLayer:
        """The axis of each array split by head over a mesh's ``model`` axis: everything of the value heads
        (values, gate, β, A_log, dt_bias, output gate, output); queries and keys by head when G = H, else
        replicated; the shared norm weight replicated."""
        qk = 1 if cfg.num_groups == cfg.num_heads else None
        return GatedDeltaNetLayer(wq=qk, wk=qk, wv=1, wa=1, w_beta=1, A_log=0, dt_bias=0, conv_q=qk, conv_k=qk,
                                  conv_v=1, wg=1, out_norm=None, wo=0)

    def __call__(self, cfg, lp: GatedDeltaNetLayer, h: Hidden, ops: ssdkit.LayerOps) -> Hidden:
        lead = h.shape[:-1]
        q, k, v = qkv(cfg, lp, h, ops)
        beta = jax.nn.sigmoid(h @ lp.w_beta)
        beta = 2 * beta if self.allow_neg_eigval else beta
        g = -jnp.exp(lp.A_log) * jax.nn.softplus(h @ lp.wa + lp.dt_bias)  # (..., H), log α <= 0
        d = ssdkit.delta_rule(q, k, v, beta, g)
        y = ops.scan(d.x, d.log_a, d.b, d.c, w=d.w, u=d.u)
        y = ssdkit.rms_norm(y, lp.out_norm, eps=cfg.norm_eps)  # per head: (..., H, P), weight (P,)
        gate = (h @ lp.wg).reshape(*lead, cfg.num_heads, cfg.head_dim)
        return (y * jax.nn.silu(gate)).reshape(*lead, cfg.num_heads * cfg.head_dim) @ lp.wo

"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over Sequence Length")
as a mixer: flash-linear-attention 0.6.0's ``fla.layers.DeltaNet`` with its defaults.

Per token (``h`` the layer's normed input, per head h of H, keys of N channels, values of P)::

    q, k, v = silu(conv_q(h W_q)), silu(conv_k(h W_k)), silu(conv_v(h W_v))      short causal convs
    q, k    = q / ‖q‖, k / ‖k‖                                                    per head (L2, eps 1e-6)
    β       = sigmoid(h W_β)                                                      one per head
    H_t     = (I - β_t k_t k_tᵀ) H_{t-1} + β_t k_t v_tᵀ                           (N, P) state per head
    o_t     = H_tᵀ q_t · N^-1/2
    out     = concat_h(RMSNorm_P(o_t)) W_o                                        norm per head, shared weight

ssdkit's state is ``Hᵀ`` (P, N); :func:`ssdkit.delta_rule` maps q, k, v, β to the scan's rank-one inputs
(``log_a = 0``, ``w = -β k``, ``u = k``, ``b = β k``, ``x = v``, ``c = q N^-1/2``). The layer computes those
inputs and calls ``ops.conv`` (three convs, as fla's ``q_conv1d``, ``k_conv1d``, ``v_conv1d``) and
``ops.scan`` once: prefill, decode, speculative verify and packed training are :class:`ssdkit.MixerLM`'s.

fla 0.6.0's arguments and how they map (defaults followed unless said):

* ``hidden_size`` = ``cfg.d_model``; ``num_heads`` = ``cfg.num_heads`` (H, value heads);
  ``head_k_dim`` = ``cfg.state_dim`` (N); ``head_v_dim`` = ``cfg.head_dim`` (P). fla derives the head dims
  from ``expand_k``, ``expand_v`` (1.0 by default: N = P = d_model / H); here they are set directly.
* ``use_short_conv=True``, ``conv_size`` = ``cfg.conv_kernel``, ``conv_bias=False``;
  ``qk_activation='silu'`` (SiLU after the q and k convs; v always gets it), ``qk_norm='l2'``.
* ``use_beta=True`` (``b_proj``, no bias); ``allow_neg_eigval`` = :attr:`DeltaNet.allow_neg_eigval`
  (β ∈ (0, 2) when set).
* ``use_gate=False``: the output norm is plain RMSNorm over each head's P channels, one weight (P,) shared
  by the heads (fla's ``o_norm = RMSNorm(head_v_dim)``), eps ``cfg.norm_eps`` (fla's model configs pass
  their ``norm_eps`` of 1e-6, LMConfig's default). The gated variant is not offered.
* Queries and keys per group: ``cfg.num_groups`` (G) q/k heads, value head h reading group
  ``h // (H / G)``. ``num_groups = num_heads`` is fla's layer; fewer groups share queries and keys across
  value heads (fla has this only for Gated DeltaNet, as ``num_v_heads > num_heads``).
* Not taken: ``qk_activation`` other than silu, ``qk_norm='sum'``, ``use_beta=False`` (a fixed layer).

Initialisation: projections lecun-normal (as ssdkit's toy mixers; fla's model re-draws every linear as
N(0, 0.02²)), conv taps U(-1/√K, 1/√K) (``torch.nn.Conv1d``'s default, which fla's ``ShortConvolution``
keeps), the norm's weight ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ssdkit

#: The L2 norm's epsilon on queries and keys (flash-linear-attention's ``l2norm`` default).
QK_NORM_EPS = 1e-6

Hidden = Float[Array, "*lead d_model"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaNetLayer:
    """One DeltaNet layer's arrays (fla's names in brackets; ``x @ w`` layout, fla's ``weight.T``).

    Attributes:
        wq, wk: (d_model, G·N) [q_proj, k_proj].
        wv: (d_model, H·P) [v_proj].
        w_beta: (d_model, H) [b_proj].
        conv_q, conv_k: (K, G·N), conv_v: (K, H·P), time-major taps [q_conv1d, k_conv1d, v_conv1d:
            ``weight[c, 0, k]`` at ``[k, c]``].
        out_norm: (P,) the per-head RMSNorm's weight, shared by the heads [o_norm].
        wo: (H·P, d_model) [o_proj].
    """

    wq: Float[Array, "d_model gn"]
    wk: Float[Array, "d_model gn"]
    wv: Float[Array, "d_model hp"]
    w_beta: Float[Array, "d_model heads"]
    conv_q: Float[Array, "kernel gn"]
    conv_k: Float[Array, "kernel gn"]
    conv_v: Float[Array, "kernel hp"]
    out_norm: Float[Array, " hdim"]
    wo: Float[Array, "hp d_model"]


def short_conv_init(key: jax.Array, kernel: int, channels: int) -> Float[Array, "kernel chan"]:
    """Depthwise conv taps U(-1/√K, 1/√K), time-major (K, C): ``torch.nn.Conv1d``'s default for one input
    channel per filter (fla's ``ShortConvolution``)."""
    bound = kernel**-0.5
    return jax.random.uniform(key, (kernel, channels), minval=-bound, maxval=bound)


def qkv(cfg, lp, h: Hidden, ops: ssdkit.LayerOps):
    """The delta-rule layers' queries, keys and values from ``lp``'s ``wq, wk, wv`` and ``conv_q, conv_k,
    conv_v`` (:class:`DeltaNetLayer`'s): ``silu(conv(h W))`` each (three ``ops.conv`` calls, in that
    order), split into heads, q and k L2-normalised per head: q, k (..., G, N), v (..., H, P)."""
    lead = h.shape[:-1]
    q = jax.nn.silu(ops.conv(h @ lp.wq, lp.conv_q)).reshape(*lead, cfg.num_groups, cfg.state_dim)
    k = jax.nn.silu(ops.conv(h @ lp.wk, lp.conv_k)).reshape(*lead, cfg.num_groups, cfg.state_dim)
    v = jax.nn.silu(ops.conv(h @ lp.wv, lp.conv_v)).reshape(*lead, cfg.num_heads, cfg.head_dim)
    return ssdkit.l2_norm(q, eps=QK_NORM_EPS), ssdkit.l2_norm(k, eps=QK_NORM_EPS), v


def qkv_conv_channels(cfg) -> tuple[int, int, int]:
    """The channels of :func:`qkv`'s three short convs: q (G·N), k (G·N), v (H·P), in that order."""
    gn, hp = cfg.num_groups * cfg.state_dim, cfg.num_heads * cfg.head_dim
    return gn, gn, hp


def delta_recurrence(cfg) -> ssdkit.Recurrence:
    """The scan of a delta-rule layer with a scalar decay per head: H heads of (P, N) states, β folded into
    per-head ``w`` and ``b`` (:func:`ssdkit.delta_rule` repeats grouped q, k to the heads)."""
    return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_heads, "scalar", cfg.chunk_size,
                             rank_one="heads")


@dataclasses.dataclass(frozen=True)
class DeltaNet:
    """The DeltaNet layer (module docstring) as an :class:`ssdkit.Mixer`.

    Attributes:
        allow_neg_eigval: β = 2·sigmoid(·) ∈ (0, 2), so the transition ``I - β k kᵀ`` may have the negative
            eigenvalue ``1 - β`` (fla's option, Grazzi et al. 2024); False (fla's default): β ∈ (0, 1).
    """

    allow_neg_eigval: bool = False

    def recurrence(self, cfg) -> ssdkit.Recurrence:
        return delta_recurrence(cfg)

    def conv_channels(self, cfg) -> tuple[int, int, int]:
        """Three short convs, of q (G·N), k (G·N) and v (H·P) channels, in that order."""
        return qkv_conv_channels(cfg)

    def init_layer(self, cfg, key: jax.Array) -> DeltaNetLayer:
        ks = jax.random.split(key, 8)
        d, gn, hp = cfg.d_model, cfg.num_groups * cfg.state_dim, cfg.num_heads * cfg.head_dim
        init = jax.nn.initializers.lecun_normal()
        return DeltaNetLayer(
            wq=init(ks[0], (d, gn)), wk=init(ks[1], (d, gn)), wv=init(ks[2], (d, hp)),
            w_beta=init(ks[3], (d, cfg.num_heads)),
            conv_q=short_conv_init(ks[4], cfg.conv_kernel, gn), conv_k=short_conv_init(ks[5], cfg.conv_kernel, gn),
            conv_v=short_conv_init(ks[6], cfg.conv_kernel, hp),
            out_norm=jnp.ones((cfg.head_dim,)), wo=init(ks[7], (hp, d)),
        )

    def head_axes(self, cfg) -> DeltaNetLayer:
        """The axis of each array split by head over a mesh's ``model`` axis: values, β and the output by
        value head; queries and keys by head when each value head has its own (G = H), else replicated;
        the shared norm weight replicated."""
        qk = 1 if cfg.num_groups == cfg.num_heads else None
        return DeltaNetLayer(wq=qk, wk=qk, wv=1, w_beta=1, conv_q=qk, conv_k=qk, conv_v=1, out_norm=None, wo=0)

    def __call__(self, cfg, lp: DeltaNetLayer, h: Hidden, ops: ssdkit.LayerOps) -> Hidden:
        lead = h.shape[:-1]
        q, k, v = qkv(cfg, lp, h, ops)
        beta = jax.nn.sigmoid(h @ lp.w_beta)
        beta = 2 * beta if self.allow_neg_eigval else beta
        d = ssdkit.delta_rule(q, k, v, beta)
        y = ops.scan(d.x, d.log_a, d.b, d.c, w=d.w, u=d.u)
        y = ssdkit.rms_norm(y, lp.out_norm, eps=cfg.norm_eps)  # per head: (..., H, P), weight (P,)
        return y.reshape(*lead, cfg.num_heads * cfg.head_dim) @ lp.wo

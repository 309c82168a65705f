"""Kimi Delta Attention (KDA, Kimi Linear): the gated delta rule with a decay per key channel.

Per head (H heads; keys and queries of N = ``cfg.state_dim`` channels, values of P = ``cfg.head_dim``),
from the layer's input ``x_t`` (d_model, already RMS-normed by the stack)::

    q_t = l2norm(silu(conv_q(x W_q))_t),   k_t = l2norm(silu(conv_k(x W_k))_t),   v_t = silu(conv_v(x W_v))_t
    g_t = -exp(A_log) · softplus(x_t F_down F_up + dt_bias)          (N,) log-decay per key channel, <= 0
    β_t = sigmoid(x_t W_b)                                              one step size per head
    H_t = (I - β_t k_t k_tᵀ) diag(exp(g_t)) H_{t-1} + β_t k_t v_tᵀ      (N, P) state: decay first, then delta
    o_t = H_tᵀ q_t · N^-1/2
    out = concat_h(RMSNorm(o_t) ⊙ w_norm ⊙ sigmoid(x_t G_down G_up + g_bias)) W_o

``l2norm(u) = u / sqrt(Σ u² + 1e-6)``. The recurrence is :func:`ssdkit.delta_rule` (``order="decay_first"``)
on ssdkit's (P, N) state ``S = Hᵀ``: ``log_a = g``, ``w = -β·exp(g) ⊙ k``, ``u = k``, ``b = β·k``, ``x = v``,
``c = q·N^-1/2``; the layer computes the inputs and calls ``ops.conv`` (three short convs) and ``ops.scan``.

The order is flash-linear-attention's: ``fla/ops/kda/naive.py`` (``naive_recurrent_kda``) first multiplies the
state by ``exp(g_t)`` and then adds ``β k (v - kᵀ S)ᵀ`` with the decayed state, which is
``(I - β k kᵀ) diag(α) H + β k vᵀ``, the decay first (checked token by token in tests/test_kda_rwkv7.py).

Mapping from ``fla.layers.kda.KimiDeltaAttention`` (flash-linear-attention 0.6.0, defaults: ``expand_v = 1``,
``num_v_heads = num_heads``, ``use_short_conv=True`` without bias, ``allow_neg_eigval=False``, the softplus
gate, ``use_qk_l2norm_in_kernel=True``, ``norm_eps = 1e-5``):

=========================  ==================================================
fla                         here (:class:`KDALayer`)
=========================  ==================================================
``q_proj, k_proj, v_proj``  ``wq, wk`` (d_model, H·N), ``wv`` (d_model, H·P)
``q/k/v_conv1d`` (silu)     ``conv_q, conv_k`` (K, H·N), ``conv_v`` (K, H·P), time-major
``f_proj[0], f_proj[1]``    ``f_down`` (d_model, P), ``f_up`` (P, H·N): the low rank is fla's head_v_dim
``b_proj``                  ``wb`` (d_model, H)
``A_log``, ``dt_bias``      ``a_log`` (H,), ``dt_bias`` (H·N,)
``g_proj[0], g_proj[1]``    ``g_down`` (d_model, P), ``g_up`` (P, H·P) with bias ``g_bias`` (H·P,)
``o_norm`` (sigmoid gate)   ``o_norm`` (P,), shared by the heads as fla's
``o_proj``                  ``wo`` (H·P, d_model)
=========================  ==================================================

(fla's ``nn.Linear`` weights are (out, in): transpose them.) Keys are per head (fla's default
``num_v_heads = num_heads``): ``cfg.num_groups`` is not used. The block's MLP (fla's ``KDABlock``) is not part
of the mixer: :class:`ssdkit.MixerLM` stacks [RMSNorm → mixer → residual].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ssdkit
from ssdkit import LMConfig

#: flash-linear-attention's l2norm epsilon (inside the square root).
L2_EPS = 1e-6


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KDALayer:
    """One KDA layer's parameters (module docstring for the fla names)."""

    wq: Float[Array, "d_model hn"]
    wk: Float[Array, "d_model hn"]
    wv: Float[Array, "d_model hp"]
    conv_q: Float[Array, "kernel hn"]
    conv_k: Float[Array, "kernel hn"]
    conv_v: Float[Array, "kernel hp"]
    f_down: Float[Array, "d_model rank"]
    f_up: Float[Array, "rank hn"]
    wb: Float[Array, "d_model heads"]
    a_log: Float[Array, " heads"]
    dt_bias: Float[Array, " hn"]
    g_down: Float[Array, "d_model rank"]
    g_up: Float[Array, "rank hp"]
    g_bias: Float[Array, " hp"]
    o_norm: Float[Array, " hdim"]
    wo: Float[Array, "hp d_model"]


@dataclasses.dataclass(frozen=True)
class KDA:
    """Kimi Delta Attention as a mixer (module docstring).

    Attributes:
        norm_eps: epsilon of the gated output RMSNorm (fla's ``norm_eps``).
    """

    norm_eps: float = 1e-5

    def recurrence(self, cfg: LMConfig) -> ssdkit.Recurrence:
        """H heads of (P, N) states, keys per head, a decay per key channel, a rank-one term per head."""
        return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_heads, "diagonal",
                                 cfg.chunk_size, rank_one="heads")

    def conv_channels(self, cfg: LMConfig) -> tuple[int, int, int]:
        """The three short convs: q (H·N), k (H·N), v (H·P)."""
        hn, hp = cfg.num_heads * cfg.state_dim, cfg.num_heads * cfg.head_dim
        return (hn, hn, hp)

    def init_layer(self, cfg: LMConfig, key: jax.Array) -> KDALayer:
        """fla's initialisation where it is a choice of KDA (``A_log = log U(1, 16)``; ``dt_bias`` the inverse
        softplus of ``dt ~ logU(0.001, 0.1)``; unit norm weight, zero gate bias); projections LeCun-normal,
        convs U(±K^-1/2) (torch's conv default)."""
        d, h, n, p, k = cfg.d_model, cfg.num_heads, cfg.state_dim, cfg.head_dim, cfg.conv_kernel
        ks = jax.random.split(key, 14)
        init = jax.nn.initializers.lecun_normal()
        bound = 1.0 / math.sqrt(k)
        conv = lambda kk, c: jax.random.uniform(kk, (k, c), minval=-bound, maxval=bound)  # noqa: E731
        dt = jnp.exp(jax.random.uniform(ks[11], (h * n,)) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = jnp.maximum(dt, 1e-4)
        return KDALayer(
            wq=init(ks[0], (d, h * n)), wk=init(ks[1], (d, h * n)), wv=init(ks[2], (d, h * p)),
            conv_q=conv(ks[3], h * n), conv_k=conv(ks[4], h * n), conv_v=conv(ks[5], h * p),
            f_down=init(ks[6], (d, p)), f_up=init(ks[7], (p, h * n)), wb=init(ks[8], (d, h)),
            a_log=jnp.log(jax.random.uniform(ks[12], (h,), minval=1.0, maxval=16.0)),
            dt_bias=dt + jnp.log(-jnp.expm1(-dt)),
            g_down=init(ks[9], (d, p)), g_up=init(ks[10], (p, h * p)), g_bias=jnp.zeros((h * p,)),
            o_norm=jnp.ones((p,)), wo=init(ks[13], (h * p, d)),
        )

    def head_axes(self, cfg: LMConfig) -> KDALayer:
        """The axis of each array split by head over a mesh's ``model`` axis (the low-rank down-projections
        and the shared norm weight are replicated)."""
        return KDALayer(wq=1, wk=1, wv=1, conv_q=1, conv_k=1, conv_v=1, f_down=None, f_up=1, wb=1, a_log=0,
                        dt_bias=0, g_down=None, g_up=1, g_bias=0, o_norm=None, wo=0)

    def __call__(self, cfg: LMConfig, lp: KDALayer, h: Float[Array, "*lead d_model"],
                 ops: ssdkit.LayerOps) -> Float[Array, "*lead d_model"]:
        lead, heads, n, p = h.shape[:-1], cfg.num_heads, cfg.state_dim, cfg.head_dim
        q = jax.nn.silu(ops.conv(h @ lp.wq, lp.conv_q)).reshape(*lead, heads, n)
        k = jax.nn.silu(ops.conv(h @ lp.wk, lp.conv_k)).reshape(*lead, heads, n)
        v = jax.nn.silu(ops.conv(h @ lp.wv, lp.conv_v)).reshape(*lead, heads, p)
        f = (h @ lp.f_down @ lp.f_up + lp.dt_bias).reshape(*lead, heads, n)
        g = -jnp.exp(lp.a_log)[:, None] * jax.nn.softplus(f)
        beta = jax.nn.sigmoid(h @ lp.wb)
        q, k = ssdkit.l2_norm(q, eps=L2_EPS), ssdkit.l2_norm(k, eps=L2_EPS)
        d = ssdkit.delta_rule(q, k, v, beta, g, order="decay_first")
        y = ops.scan(d.x, d.log_a, d.b, d.c, w=d.w, u=d.u)
        gate = (h @ lp.g_down @ lp.g_up + lp.g_bias).reshape(*lead, heads, p)
        y = ssdkit.rms_norm(y, lp.o_norm, eps=self.norm_eps) * jax.nn.sigmoid(gate)
        return y.reshape(*lead, heads * p) @ lp.wo

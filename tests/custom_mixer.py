"""A user's own layer, outside the package: a gated delta rule with short convs (Gated DeltaNet-style).

tests/test_custom_mixer.py trains it with ``ssdkit train --arch tests.custom_mixer:GatedDelta``, generates
with it (plain and speculative) and evaluates it through the commands; tests/sharding_check.py runs it on a
mesh. It is written only against the public protocol (``ssdkit.Mixer``: ``ops.conv``, ``ops.scan``,
``head_axes``) and public functions (``ssdkit.delta_rule``, ``ssdkit.l2_norm``, ``ssdkit.rms_norm``)::

    q, k, v = silu(conv(h W_q)), silu(conv(h W_k)), silu(conv(h W_v))      three short causal convs
    q, k ← q / |q|, k / |k| per head;   β = sigmoid(h W_β);   g = -exp(A_log) · softplus(h W_g + dt_bias)
    H_t = (I - β_t k_t k_tᵀ) exp(g_t) H_{t-1} + β_t k_t v_tᵀ,   o_t = H_tᵀ q_t / sqrt(N)
    out = RMSNorm_per_head(o) W_o

The other classes are the ways a ``--arch package.module:Class`` can be wrong, for the error tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ssdkit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GatedDeltaLayer:
    wq: jax.Array  # (d_model, H·N)
    wk: jax.Array  # (d_model, H·N)
    wv: jax.Array  # (d_model, H·P)
    conv_q: jax.Array  # (K, H·N)
    conv_k: jax.Array  # (K, H·N)
    conv_v: jax.Array  # (K, H·P)
    w_beta: jax.Array  # (d_model, H)
    w_gate: jax.Array  # (d_model, H)
    dt_bias: jax.Array  # (H,)
    a_log: jax.Array  # (H,)
    out_norm: jax.Array  # (P,), shared by the heads
    wo: jax.Array  # (H·P, d_model)


@dataclasses.dataclass(frozen=True)
class GatedDelta:
    """Keys and queries per head; every head-major array split by head over a mesh's ``model`` axis."""

    order: str = "decay_first"

    def recurrence(self, cfg) -> ssdkit.Recurrence:
        return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, num_groups=cfg.num_heads,
                                 decay="scalar", chunk_size=cfg.chunk_size, rank_one="heads")

    def conv_channels(self, cfg) -> tuple[int, int, int]:
        hn, hp = cfg.num_heads * cfg.state_dim, cfg.num_heads * cfg.head_dim
        return hn, hn, hp

    def init_layer(self, cfg, key) -> GatedDeltaLayer:
        ks = jax.random.split(key, 9)
        d, h = cfg.d_model, cfg.num_heads
        hn, hp = h * cfg.state_dim, h * cfg.head_dim
        init = jax.nn.initializers.lecun_normal()
        conv = lambda k, c: jax.random.uniform(k, (cfg.conv_kernel, c), minval=-0.5, maxval=0.5)  # noqa: E731
        return GatedDeltaLayer(
            wq=init(ks[0], (d, hn)), wk=init(ks[1], (d, hn)), wv=init(ks[2], (d, hp)),
            conv_q=conv(ks[3], hn), conv_k=conv(ks[4], hn), conv_v=conv(ks[5], hp),
            w_beta=init(ks[6], (d, h)), w_gate=init(ks[7], (d, h)), dt_bias=jnp.full((h,), -2.0),
            a_log=jnp.log(jnp.linspace(1.0, 8.0, h)), out_norm=jnp.ones((cfg.head_dim,)), wo=init(ks[8], (hp, d)))

    def head_axes(self, cfg) -> GatedDeltaLayer:
        """Each array's head axis (its columns or rows are head-major), None for the shared norm."""
        return GatedDeltaLayer(wq=1, wk=1, wv=1, conv_q=1, conv_k=1, conv_v=1, w_beta=1, w_gate=1, dt_bias=0,
                               a_log=0, out_norm=None, wo=0)

    def __call__(self, cfg, lp: GatedDeltaLayer, h, ops: ssdkit.LayerOps):
        lead, heads = h.shape[:-1], cfg.num_heads
        q = ssdkit.l2_norm(jax.nn.silu(ops.conv(h @ lp.wq, lp.conv_q)).reshape(*lead, heads, cfg.state_dim))
        k = ssdkit.l2_norm(jax.nn.silu(ops.conv(h @ lp.wk, lp.conv_k)).reshape(*lead, heads, cfg.state_dim))
        v = jax.nn.silu(ops.conv(h @ lp.wv, lp.conv_v)).reshape(*lead, heads, cfg.head_dim)
        beta = jax.nn.sigmoid(h @ lp.w_beta)
        g = -jnp.exp(lp.a_log) * jax.nn.softplus(h @ lp.w_gate + lp.dt_bias)
        d = ssdkit.delta_rule(q, k, v, beta, g, order=self.order)
        y = ops.scan(d.x, d.log_a, d.b, d.c, w=d.w, u=d.u)
        y = ssdkit.rms_norm(y, lp.out_norm, eps=cfg.norm_eps)
        return y.reshape(*lead, -1) @ lp.wo


# ------------------------------------------------------------------ what --arch refuses
@dataclasses.dataclass(frozen=True)
class NoCall:
    """Lacks ``__call__``: not a mixer."""

    def recurrence(self, cfg):
        return GatedDelta().recurrence(cfg)

    def conv_channels(self, cfg):
        return 0

    def init_layer(self, cfg, key):
        return {}


@dataclasses.dataclass(frozen=True)
class NeedsArguments(GatedDelta):
    """A setting without a default: ``--arch`` cannot build it."""

    width: int = dataclasses.field(kw_only=True)


class Unhashable(GatedDelta):
    """Unhashable: it cannot be a static argument of jit."""

    __hash__ = None

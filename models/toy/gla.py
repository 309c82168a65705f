"""Gated linear attention (GLA-style): a data-dependent decay per head *and state channel*.

    v = silu(conv(h W_v))                           short causal conv over the values
    log α_t = logsigmoid(h_t W_g) / 16              (batch, seq, H, N), diagonal decay
    S_t = exp(log α_t) ⊙ S_{t-1} + v_t ⊗ k_t,   y_t = S_t · q_t,   out = RMSNorm(y) W_o
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ssdkit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GLALayer:
    wq: jax.Array  # (d_model, G·N)
    wk: jax.Array  # (d_model, G·N)
    wv: jax.Array  # (d_model, H·P)
    wg: jax.Array  # (d_model, H·N)  decay gate
    conv_w: jax.Array  # (K, H·P)
    out_norm: jax.Array  # (H·P,)
    wo: jax.Array  # (H·P, d_model)


@dataclasses.dataclass(frozen=True)
class GLA:
    gate_temperature: float = 16.0

    def recurrence(self, cfg) -> ssdkit.Recurrence:
        return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_groups,
                                 "diagonal", cfg.chunk_size)

    def conv_channels(self, cfg) -> int:
        return cfg.num_heads * cfg.head_dim

    def init_layer(self, cfg, key) -> GLALayer:
        ks = jax.random.split(key, 6)
        d, gn, hp = cfg.d_model, cfg.num_groups * cfg.state_dim, cfg.num_heads * cfg.head_dim
        init = jax.nn.initializers.lecun_normal()
        conv = jax.random.uniform(ks[5], (cfg.conv_kernel, hp), minval=-0.5, maxval=0.5)
        return GLALayer(init(ks[0], (d, gn)), init(ks[1], (d, gn)), init(ks[2], (d, hp)),
                        init(ks[3], (d, cfg.num_heads * cfg.state_dim)), conv, jnp.ones((hp,)),
                        init(ks[4], (hp, d)))

    def head_axes(self, cfg) -> GLALayer:
        """The axis of each array split by head over a mesh's ``model`` axis (queries and keys are per
        group: replicated)."""
        return GLALayer(wq=None, wk=None, wv=1, wg=1, conv_w=1, out_norm=0, wo=0)

    def __call__(self, cfg, lp: GLALayer, h, ops: ssdkit.LayerOps):
        lead = h.shape[:-1]
        q = (h @ lp.wq).reshape(*lead, cfg.num_groups, cfg.state_dim)
        k = (h @ lp.wk).reshape(*lead, cfg.num_groups, cfg.state_dim) * cfg.state_dim**-0.5
        v = jax.nn.silu(ops.conv(h @ lp.wv, lp.conv_w)).reshape(*lead, cfg.num_heads, cfg.head_dim)
        log_a = jax.nn.log_sigmoid(h @ lp.wg).reshape(*lead, cfg.num_heads, cfg.state_dim)
        y = ops.scan(v, log_a / self.gate_temperature, k, q)
        y = ssdkit.rms_norm(y.reshape(*lead, -1), lp.out_norm, eps=cfg.norm_eps)
        return y @ lp.wo

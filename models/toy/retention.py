"""Retention (RetNet-style): a fixed scalar decay per head, ``γ_h = 1 - 2^(-5-h)``.

    S_t = γ_h S_{t-1} + v_t ⊗ k_t,   y_t = S_t · q_t,   out = (y / sqrt(N)) W_o
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import ssdkit


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetentionLayer:
    wq: jax.Array  # (d_model, G·N)
    wk: jax.Array  # (d_model, G·N)
    wv: jax.Array  # (d_model, H·P)
    wo: jax.Array  # (H·P, d_model)


@dataclasses.dataclass(frozen=True)
class Retention:
    def recurrence(self, cfg) -> ssdkit.Recurrence:
        return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_groups,
                                 "scalar", cfg.chunk_size)

    def conv_channels(self, cfg) -> int:
        return 0  # no short conv

    def init_layer(self, cfg, key) -> RetentionLayer:
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, gn, hp = cfg.d_model, cfg.num_groups * cfg.state_dim, cfg.num_heads * cfg.head_dim
        init = jax.nn.initializers.lecun_normal()
        return RetentionLayer(init(kq, (d, gn)), init(kk, (d, gn)), init(kv, (d, hp)),
                              init(ko, (hp, d)))

    def head_axes(self, cfg) -> RetentionLayer:
        """The axis of each array split by head over a mesh's ``model`` axis."""
        return RetentionLayer(wq=None, wk=None, wv=1, wo=0)

    def __call__(self, cfg, lp: RetentionLayer, h, ops: ssdkit.LayerOps):
        lead = h.shape[:-1]
        q = (h @ lp.wq).reshape(*lead, cfg.num_groups, cfg.state_dim)
        k = (h @ lp.wk).reshape(*lead, cfg.num_groups, cfg.state_dim)
        v = (h @ lp.wv).reshape(*lead, cfg.num_heads, cfg.head_dim)
        gamma = 1.0 - 2.0 ** (-5.0 - jnp.arange(cfg.num_heads, dtype=jnp.float32))
        y = ops.scan(v, jnp.broadcast_to(jnp.log(gamma), (*lead, cfg.num_heads)), k, q)
        return (y * cfg.state_dim**-0.5).reshape(*lead, -1) @ lp.wo

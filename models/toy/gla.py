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
    norm: jax.Array  # (d_model,)
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
        return GLALayer(jnp.ones((d,)), init(ks[0], (d, gn)), init(ks[1], (d, gn)), init(ks[2], (d, hp)),
                        init(ks[3], (d, cfg.num_heads * cfg.state_dim)), conv, jnp.ones((hp,)),
                        init(ks[4], (hp, d)))

    def __call__(self, cfg, lp: GLALayer, h, cache: ssdkit.RecurrentCache, *, step: bool, segment_ids=None):
        lead = h.shape[:-1]
        q = (h @ lp.wq).reshape(*lead, cfg.num_groups, cfg.state_dim)
        k = (h @ lp.wk).reshape(*lead, cfg.num_groups, cfg.state_dim) * cfg.state_dim**-0.5
        if step:
            v, window = ssdkit.causal_conv1d_step(h @ lp.wv, lp.conv_w, None, cache.conv)
        else:
            v, window = ssdkit.causal_conv1d(h @ lp.wv, lp.conv_w, None, window=cache.conv, segment_ids=segment_ids)
        v = jax.nn.silu(v).reshape(*lead, cfg.num_heads, cfg.head_dim)
        log_a = jax.nn.log_sigmoid(h @ lp.wg).reshape(*lead, cfg.num_heads, cfg.state_dim)
        log_a = log_a / self.gate_temperature
        if step:
            y, state = ssdkit.ssd_step(cache.state, v, log_a, k, q)
        else:
            y, state = ssdkit.ssd_scan(v, log_a, k, q, chunk_size=cfg.chunk_size, initial_state=cache.state,
                                       segment_ids=segment_ids)
        y = ssdkit.rms_norm(y.reshape(*lead, -1), lp.out_norm, eps=cfg.norm_eps)
        return y @ lp.wo, ssdkit.RecurrentCache(conv=window, state=state)

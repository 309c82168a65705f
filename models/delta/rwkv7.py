"""RWKV-7 "Goose": a generalised delta rule with a vector decay and an in-context learning rate.

One mixer is the whole RWKV-7 block, time mixing and channel mixing, each with its LayerNorm::

    h' = h + TimeMix(LN1(h))            out = TimeMix(LN1(h)) + ChannelMix(LN2(h'))

so ``pre_norm = False``: :class:`ssdkit.MixerLM` hands the mixer the residual stream ``h`` and adds ``out``
to it, which gives the block's result ``h' + ChannelMix(LN2(h'))``.

Time mixing, per token (x = LN1(h); H heads, keys of N = ``cfg.state_dim``, values of P = ``cfg.head_dim``)::

    x̄_t = x_{t-1} (0 before the first token)                 token shift: ops.conv with a one-hot kernel
    x_◇ = x + (x̄ - x) ⊙ μ_◇               for ◇ in r, w, k, v, a, g
    r = x_r W_r,  k = x_k W_k,  v = x_v W_v                      (N,), (N,), (P,) per head
    log w = -e^{-1/2} · sigmoid(w0 + tanh(x_w W1) W2)           (N,) per head, in (-0.607, 0)
    a = sigmoid(a0 + x_a A1 A2)                                  in-context learning rate, (N,) per head
    g = sigmoid(x_g G1) G2                                       output gate (H·P,)
    κ̂ = normalise(k ⊙ k_k)                                       unit per head (F.normalize)
    k̃ = k ⊙ (1 + (a - 1) ⊙ k_a)
    S_t = S_{t-1} (diag(w_t) - κ̂_t (κ̂_t ⊙ a_t)ᵀ) + v_t k̃_tᵀ      (P, N) state per head
    y_t = S_t r_t
    TimeMix = ((GroupNorm_H(y) + (Σ_n r ⊙ k̃ ⊙ r_k) v) ⊙ g) W_o

Channel mixing (z = LN2(h'))::

    ChannelMix = relu((z + (z̄ - z) ⊙ μ_c) C_k)² C_v            z̄_t = z_{t-1}

**The transition in ssdkit's convention.** The published update (BlinkDL's RWKV-LM v7 and flash-linear-
attention's ``naive_recurrent_rwkv7``, whose state is indexed [value, key]) is
``S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_tᵀ + v_t k_tᵀ`` with the kernel's ``a = -κ̂``, ``b = κ̂ ⊙ a`` (fla's
layer passes ``a=-kk, b=kk*a``), i.e. ``S_t = S_{t-1} (diag(w_t) + (-κ̂_t)(κ̂_t ⊙ a_t)ᵀ) + v_t k̃_tᵀ``. That is
:func:`ssdkit.ssd_scan`'s ``S_t = S_{t-1} (diag(exp(log_a_t)) + w_t u_tᵀ) + x_t ⊗ b_t`` with::

    log_a = log w,   w = -κ̂,   u = κ̂ ⊙ a,   x = v,   b = k̃,   c = r   (scale 1, inclusive readout)

On fla's (K, V) chunk-kernel state ``H = Sᵀ`` the same update reads ``H_t = diag(w_t) H_{t-1} +
(κ̂_t ⊙ a_t)(-κ̂_tᵀ H_{t-1}) + k̃_t v_tᵀ``, ``o_t = H_tᵀ r_t`` (tests/test_kda_rwkv7.py writes it out token by token).

**The r_k term is not the scan's bonus.** ``ops.scan(..., bonus=)`` adds ``((bonus ⊙ c_t)·b_t) x_t`` to ``y``
*before* the layer's output norm; RWKV-7 adds ``(Σ_n r ⊙ k̃ ⊙ r_k) v`` *after* the GroupNorm (BlinkDL's
``RWKV_Tmix_x070``; fla's ``gate_output_correction``), so the layer adds it itself: a per-token term that
needs no state.

**Left out.** The value residual (``v_first``: layer 0's values, mixed into every later layer's ``v`` by
``v_lora``) crosses layers, which a stack of identical layers (one mixer, the layers scanned) cannot express:
every layer uses its own ``v``. So is the extra LayerNorm of the embeddings in layer 0 (``pre_norm``/``ln0``);
the stack's final norm is :class:`ssdkit.MixerLM`'s RMSNorm (RWKV's is a LayerNorm).

Mapping from ``fla.layers.rwkv7.RWKV7Attention`` and ``fla.models.rwkv7.RWKV7Block`` / ``RWKV7FeedForward``
(flash-linear-attention 0.6.0; fla's ``nn.Linear`` weights are (out, in): transpose them; its LoRA is
``Linear(no bias) → activation → Linear``, the second bias being w0 / a0):

==================================  ============================================================
fla                                  here (:class:`RWKV7Layer`)
==================================  ============================================================
``attn_norm``, ``ffn_norm``          ``ln1_w, ln1_b``, ``ln2_w, ln2_b`` (d_model,)
``x_r, x_w, x_k, x_v, x_a, x_g``     ``mix`` (6, d_model), rows in that order
``r_proj, k_proj, v_proj, o_proj``   ``wr, wk`` (d_model, H·N), ``wv`` (d_model, H·P), ``wo`` (H·P, d_model)
``w_lora`` (tanh)                    ``w1`` (d_model, R_w), ``w2`` (R_w, H·N), ``w0`` (H·N,)
``a_lora``                           ``a1`` (d_model, R_a), ``a2`` (R_a, H·N), ``a0`` (H·N,)
``g_lora`` (sigmoid, no bias)        ``g1`` (d_model, R_g), ``g2`` (R_g, H·P)
``k_k, k_a``, ``r_k``                ``k_k, k_a`` (H·N,), ``r_k`` (H, N)
``g_norm`` (GroupNorm, H groups)     ``gn_w, gn_b`` (H·P,), eps = P · ``norm_eps`` (fla: head_dim · norm_eps)
``ffn.x_k, ffn.key, ffn.value``      ``ffn_mix`` (d_model,), ``ffn_key`` (d_model, F), ``ffn_value`` (F, d_model)
``v_lora``                           none (the value residual, above)
==================================  ============================================================

The two token shifts are ``ops.conv`` calls (``conv_channels = (d_model, d_model)``) with the fixed kernel
``e_{K-2}`` (``weight[K-2] = 1``: the previous input): a conv is how the cache carries past inputs, so prefill,
decode, packed documents (the shift reads 0 at a document's start, as fla's ``cu_seqlens``) and speculative
rollback come with it. It needs ``cfg.conv_kernel >= 2`` (the window keeps K-1 inputs, one is used).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

import ssdkit
from ssdkit import LMConfig

#: log of the largest decay step: log w = -exp(-1/2) · sigmoid(·) (BlinkDL's ``-softplus(-·) - 0.5`` inside
#: ``exp(-exp(·))``).
DECAY_SCALE = math.exp(-0.5)
#: F.normalize's floor on the norm.
NORMALISE_EPS = 1e-12
#: Rows of :attr:`RWKV7Layer.mix`.
MIX_ROWS = ("r", "w", "k", "v", "a", "g")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RWKV7Layer:
    """One RWKV-7 block's parameters (module docstring for the fla names)."""

    ln1_w: Float[Array, " d_model"]
    ln1_b: Float[Array, " d_model"]
    mix: Float[Array, "6 d_model"]
    wr: Float[Array, "d_model hn"]
    wk: Float[Array, "d_model hn"]
    wv: Float[Array, "d_model hp"]
    w0: Float[Array, " hn"]
    w1: Float[Array, "d_model rank_w"]
    w2: Float[Array, "rank_w hn"]
    a0: Float[Array, " hn"]
    a1: Float[Array, "d_model rank_a"]
    a2: Float[Array, "rank_a hn"]
    g1: Float[Array, "d_model rank_g"]
    g2: Float[Array, "rank_g hp"]
    k_k: Float[Array, " hn"]
    k_a: Float[Array, " hn"]
    r_k: Float[Array, "heads state"]
    gn_w: Float[Array, " hp"]
    gn_b: Float[Array, " hp"]
    wo: Float[Array, "hp d_model"]
    ln2_w: Float[Array, " d_model"]
    ln2_b: Float[Array, " d_model"]
    ffn_mix: Float[Array, " d_model"]
    ffn_key: Float[Array, "d_model ffn"]
    ffn_value: Float[Array, "ffn d_model"]


def normalise(u: Float[Array, "*lead n"]) -> Float[Array, "*lead n"]:
    """``u / max(|u|, 1e-12)`` over the last axis (torch's ``F.normalize``), with a finite gradient at 0."""
    return u * jax.lax.rsqrt(jnp.maximum(jnp.sum(u * u, axis=-1, keepdims=True), NORMALISE_EPS**2))


def shift_kernel(kernel: int, channels: int, dtype) -> Float[Array, "kernel chan"]:
    """The conv weight whose output is the previous input: ``weight[K-2] = 1``, zeros elsewhere."""
    return jnp.zeros((kernel, channels), dtype).at[kernel - 2].set(1)


def _profile(cfg: LMConfig):
    """fla's per-channel init profiles over H·N channels: ``linear`` from -1/2 to 1/2 over the layer and
    ``zigzag`` (per head, from -1 to 1, signed square)."""
    hn, n = cfg.num_heads * cfg.state_dim, cfg.state_dim
    idx = jnp.arange(hn)
    linear = idx / max(hn - 1, 1) - 0.5
    z = ((idx % n) - (n - 1) / 2) / max((n - 1) / 2, 1)
    return linear, z * jnp.abs(z)


@dataclasses.dataclass(frozen=True)
class RWKV7:
    """RWKV-7 as a mixer: one whole block (time and channel mixing; module docstring).

    Attributes:
        decay_rank, a_rank, gate_rank: the LoRA ranks of the decay, the learning rate and the gate (fla
            and BlinkDL use 32 to 128; small defaults for small models).
        ffn_ratio: the channel mixing's width over d_model (fla's ``hidden_ratio``).
        norm_eps: the LayerNorms' epsilon; the GroupNorm's is ``head_dim · norm_eps`` (fla's).
    """

    decay_rank: int = 8
    a_rank: int = 8
    gate_rank: int = 8
    ffn_ratio: int = 4
    norm_eps: float = 1e-5
    pre_norm: ClassVar[bool] = False

    def recurrence(self, cfg: LMConfig) -> ssdkit.Recurrence:
        """H heads of (P, N) states, keys per head, a decay per key channel, a rank-one term per head."""
        if cfg.conv_kernel < 2:
            raise ValueError(f"RWKV7's token shift is a conv of the cache's kernel: it needs conv_kernel >= 2 "
                             f"(the previous input), got {cfg.conv_kernel}")
        return ssdkit.Recurrence(cfg.num_heads, cfg.head_dim, cfg.state_dim, cfg.num_heads, "diagonal",
                                 cfg.chunk_size, rank_one="heads")

    def conv_channels(self, cfg: LMConfig) -> tuple[int, int]:
        """The two token shifts: time mixing's input and channel mixing's (d_model each)."""
        return (cfg.d_model, cfg.d_model)

    def init_layer(self, cfg: LMConfig, key: jax.Array) -> RWKV7Layer:
        """fla's constants where they are RWKV-7's choice, for a middle layer (its profiles depend on the
        layer's depth, which a stack of identical layers does not pass): ``w0`` from -6 to 0.5 plus a zigzag
        per head, ``a0``, ``k_k = 0.71 - 0.1·linear``, ``k_a = 1.02``, ``r_k = -0.04``; the lerp mixes
        U(0, 1). Projections are LeCun-normal, the LoRA down-projections a tenth of that, and ``wo`` and
        ``ffn_value`` random too (fla and BlinkDL zero them: a fresh model would be the identity)."""
        d, h, n, p = cfg.d_model, cfg.num_heads, cfg.state_dim, cfg.head_dim
        hn, hp, f = h * n, h * p, self.ffn_ratio * d
        ks = jax.random.split(key, 13)
        init = jax.nn.initializers.lecun_normal()
        linear, zigzag = _profile(cfg)
        return RWKV7Layer(
            ln1_w=jnp.ones((d,)), ln1_b=jnp.zeros((d,)), mix=jax.random.uniform(ks[0], (len(MIX_ROWS), d)),
            wr=init(ks[1], (d, hn)), wk=init(ks[2], (d, hn)), wv=init(ks[3], (d, hp)),
            w0=-6.0 + 6.0 * (linear + 0.5) ** 1.8 + 0.5 + 2.5 * zigzag,
            w1=0.1 * init(ks[4], (d, self.decay_rank)), w2=init(ks[5], (self.decay_rank, hn)),
            a0=-0.19 + 0.3 * zigzag + 0.4 * linear,
            a1=0.1 * init(ks[6], (d, self.a_rank)), a2=init(ks[7], (self.a_rank, hn)),
            g1=0.1 * init(ks[8], (d, self.gate_rank)), g2=init(ks[9], (self.gate_rank, hp)),
            k_k=0.71 - 0.1 * linear, k_a=jnp.full((hn,), 1.02), r_k=jnp.full((h, n), -0.04),
            gn_w=jnp.ones((hp,)), gn_b=jnp.zeros((hp,)), wo=init(ks[10], (hp, d)),
            ln2_w=jnp.ones((d,)), ln2_b=jnp.zeros((d,)), ffn_mix=jax.random.uniform(ks[11], (d,)),
            ffn_key=init(ks[12], (d, f)), ffn_value=init(jax.random.fold_in(ks[12], 1), (f, d)),
        )

    def head_axes(self, cfg: LMConfig) -> RWKV7Layer:
        """The axis of each array split by head over a mesh's ``model`` axis; the norms, lerp mixes, LoRA
        down-projections and the channel mixing are replicated."""
        return RWKV7Layer(ln1_w=None, ln1_b=None, mix=None, wr=1, wk=1, wv=1, w0=0, w1=None, w2=1, a0=0,
                          a1=None, a2=1, g1=None, g2=1, k_k=0, k_a=0, r_k=0, gn_w=0, gn_b=0, wo=0, ln2_w=None,
                          ln2_b=None, ffn_mix=None, ffn_key=None, ffn_value=None)

    def __call__(self, cfg: LMConfig, lp: RWKV7Layer, h: Float[Array, "*lead d_model"],
                 ops: ssdkit.LayerOps) -> Float[Array, "*lead d_model"]:
        lead, heads, n, p = h.shape[:-1], cfg.num_heads, cfg.state_dim, cfg.head_dim
        shift = shift_kernel(cfg.conv_kernel, cfg.d_model, h.dtype)
        per_head = lambda u, width: u.reshape(*lead, heads, width)  # noqa: E731

        # time mixing
        x = ssdkit.layer_norm(h, lp.ln1_w, lp.ln1_b, eps=self.norm_eps)
        delta = ops.conv(x, shift) - x
        xr, xw, xk, xv, xa, xg = (x + delta * lp.mix[i] for i in range(len(MIX_ROWS)))
        r, k, v = per_head(xr @ lp.wr, n), per_head(xk @ lp.wk, n), per_head(xv @ lp.wv, p)
        log_w = -DECAY_SCALE * jax.nn.sigmoid(per_head(lp.w0 + jnp.tanh(xw @ lp.w1) @ lp.w2, n))
        a = jax.nn.sigmoid(per_head(lp.a0 + xa @ lp.a1 @ lp.a2, n))
        g = jax.nn.sigmoid(xg @ lp.g1) @ lp.g2
        kappa = normalise(k * lp.k_k.reshape(heads, n))
        k = k * (1 + (a - 1) * lp.k_a.reshape(heads, n))
        y = ops.scan(v, log_w, k, r, w=-kappa, u=kappa * a)
        y = ssdkit.layer_norm(y.reshape(*lead, heads * p), lp.gn_w, lp.gn_b, num_groups=heads,
                              eps=p * self.norm_eps)
        y = y + (jnp.sum(r * k * lp.r_k, axis=-1, keepdims=True) * v).reshape(*lead, heads * p)
        time_mix = (y * g) @ lp.wo

        # channel mixing, on the stream after the time mixing
        z = ssdkit.layer_norm(h + time_mix, lp.ln2_w, lp.ln2_b, eps=self.norm_eps)
        zk = z + (ops.conv(z, shift) - z) * lp.ffn_mix
        channel_mix = jnp.square(jax.nn.relu(zk @ lp.ffn_key)) @ lp.ffn_value
        return time_mix + channel_mix

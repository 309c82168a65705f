"""Mamba-2 against the PyTorch reference (transformers' Mamba2ForCausalLM, plain-PyTorch CPU path).

Random small models are built in torch, saved in both checkpoint formats (mamba_ssm's
``pytorch_model.bin`` and transformers' ``model.safetensors``), loaded with ssdkit and compared:

* logits at every position and the final normed hidden state: max abs error <= 1e-5 relative to the
  largest |expected| entry. Both sides run in float32 with float32 states and sum the same terms in a
  different order (our chunked SSD vs torch's own chunking, different matmul kernels). Measured:
  2.5e-7 to 4.7e-7 relative (float32 rounding); 1e-5 leaves a 20x margin, while a wrong term (a
  misplaced group, a missing D skip, an unclamped dt) shows up as an O(1e-2..1) difference.
* cached greedy decoding for 64 steps: identical tokens up to a near tie (``assert_same_greedy_tokens``;
  torch and JAX are two programs). A near tie is a top-2 gap of torch's logits below twice the parity
  bound, 2 * 1e-5 * max|logits|: only there may rounding flip the choice; after it the rows diverge.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssdkit.models import mamba2
from tests.helpers import assert_close, assert_same_greedy_tokens, greedy_margins

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PARITY_RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _torch_on_one_thread():
    """Models this small run fastest on one thread; more spin-wait (and burn CPU) on a busy machine, e.g. the
    suite's own parallel workers. Put back afterwards: torch's setting is process-wide."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CONFIGS = {
    # Several chunks per sequence, lengths not a multiple of the chunk. An untied LM head makes greedy
    # decoding of a random model wander over the vocabulary (~30-50 distinct tokens in 64 steps); with
    # a tied head it repeats one token, which would make the token-match test weak (kept for "tied").
    "small": dict(d_model=64, n_layer=2, vocab_size=100, d_state=16, headdim=16, chunk_size=16, ngroups=1,
                  tie_embeddings=False),
    "groups": dict(d_model=64, n_layer=3, vocab_size=80, d_state=8, headdim=32, chunk_size=8, ngroups=2,
                   tie_embeddings=False),
    "tied": dict(d_model=48, n_layer=2, vocab_size=64, d_state=16, headdim=24, chunk_size=16, ngroups=1),
}


# Each comparison against torch compiles its own programs for its config (~3-10 CPU-s each): by default each
# runs for one config, the one it checks best (logits and hidden states: groups and 3 layers; greedy decoding:
# "small", whose untied head wanders over the vocabulary; loss and gradients: "tied", where the embedding's
# gradient sums its two uses); the other configs are long. Loading, saving and the checkpoint formats (no
# compilation) run for every config.
def _one_config(default):
    return pytest.mark.parametrize(
        "reference", [name if name == default else pytest.param(name, marks=pytest.mark.long)
                      for name in sorted(CONFIGS)], indirect=True)


def _hf_config(cfg: mamba2.Mamba2Config):
    return transformers.Mamba2Config(**cfg.to_transformers_dict())


def _randomise(model, seed):
    """Give every parameter a non-trivial random value (transformers' init leaves norms at 1, D at 1
    and A_log = log(1..H), which would let a wrong group or head mapping pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16, generator=g)))
            elif name.endswith("dt_bias"):
                dt = torch.exp(torch.empty_like(p).uniform_(np.log(1e-3), np.log(1e-1), generator=g))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif name.endswith(".D") or "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # std 1: well-separated greedy logits
            else:
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=g) / np.sqrt(p.shape[-1]))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """A random torch model, saved in both formats; returns (cfg, torch model, dir_bin, dir_safetensors)."""
    name = request.param
    cfg = mamba2.Mamba2Config(**CONFIGS[name])
    torch.manual_seed(0)
    model = _randomise(transformers.Mamba2ForCausalLM(_hf_config(cfg)).eval(), seed=1)

    st_dir = tmp_path_factory.mktemp(f"{name}_hf")
    model.save_pretrained(st_dir)

    bin_dir = tmp_path_factory.mktemp(f"{name}_mamba_ssm")
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
             for k, v in model.state_dict().items()}
    # Official checkpoints store most tensors in fp16 and some in fp32; keep float32 here so that the
    # comparison measures the implementation, not a rounding of the weights.
    torch.save(state, bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    return cfg, model, bin_dir, st_dir


def _tokens(cfg, batch, seq, seed=0):
    # No id 0: transformers treats a trailing 0 (its pad id) as right padding and changes its path.
    return np.random.default_rng(seed).integers(1, cfg.vocab_size, (batch, seq)).astype(np.int32)


def test_both_formats_load_identically(reference):
    cfg, _, bin_dir, st_dir = reference
    p_bin, cfg_bin = mamba2.load_checkpoint(bin_dir)
    p_st, cfg_st = mamba2.load_checkpoint(st_dir)
    assert cfg_bin.nheads == cfg_st.nheads == cfg.nheads
    assert cfg_bin.padded_vocab_size == cfg_st.padded_vocab_size
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_bin, p_st)


@pytest.mark.numerics  # floats of compiled programs against torch: rerun with AVX2 (README)
@_one_config("groups")
def test_logits_and_hidden_match_transformers(reference):
    cfg, model, bin_dir, _ = reference
    params, cfg = mamba2.load_checkpoint(bin_dir)
    tokens = _tokens(cfg, batch=2, seq=45)  # 45 = 2 chunks + a ragged tail (chunk 16) / 5.6 chunks (8)
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    logits, hidden = mamba2.forward(params, cfg, jnp.asarray(tokens), return_hidden=True)
    assert_close(logits, out.logits.numpy(), rtol=PARITY_RTOL, name="logits")
    assert_close(hidden, out.hidden_states[-1].numpy(), rtol=PARITY_RTOL, name="final hidden state")


@_one_config("small")  # token ids through the margin-aware helper: no numerics mark needed
def test_greedy_decoding_matches_transformers_for_64_steps(reference):
    cfg, model, _, st_dir = reference
    params, cfg = mamba2.load_checkpoint(st_dir)
    prompt = _tokens(cfg, batch=2, seq=21, seed=3)
    with torch.no_grad():
        ref = model.generate(torch.as_tensor(prompt, dtype=torch.long),
                             attention_mask=torch.ones(prompt.shape, dtype=torch.long), max_new_tokens=64,
                             do_sample=False, min_new_tokens=64, use_cache=True, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    ref_new = ref.sequences[:, prompt.shape[1]:].numpy()
    logits = torch.stack(ref.logits, dim=1).numpy()  # (batch, 64, vocab): what each token was chosen from
    res = mamba2.generate(params, cfg, jnp.asarray(prompt), max_new_tokens=64)
    assert_same_greedy_tokens(res.tokens, ref_new, greedy_margins(logits),
                              tie=2 * PARITY_RTOL * float(np.abs(logits).max()))
    np.testing.assert_array_equal(np.asarray(res.lengths), [64, 64])  # no EOS: a count, whatever the tokens


def test_saved_checkpoint_loads_in_transformers_with_same_logits(reference, tmp_path):
    cfg, model, bin_dir, _ = reference
    params, cfg = mamba2.load_checkpoint(bin_dir)
    mamba2.save_checkpoint(params, cfg, tmp_path)
    reloaded, info = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens = torch.as_tensor(_tokens(cfg, batch=1, seq=30, seed=5), dtype=torch.long)
    with torch.no_grad():
        # Exact: the same torch model code on bit-identical weights (what this test checks) is one program.
        np.testing.assert_array_equal(reloaded.eval()(tokens).logits.numpy(), model(tokens).logits.numpy())


# Gradients: per-tensor relative error ||g - g_ref|| / ||g_ref||. Both sides backpropagate the same
# float32 loss through different programs (our blockwise head, chunked scan and its autodiff against
# torch's chunked forward and autograd), so each gradient entry carries rounding of the forward values
# (~1e-6 relative, see PARITY_RTOL) amplified by the chain of a few layers; 1e-4 in the norm sits well
# above that and far below any real error (a dropped term or a wrong group moves a tensor's gradient by O(1)).
GRAD_RTOL = 1e-4
LOSS_PARITY_RTOL = 1e-6


@pytest.mark.numerics
@_one_config("tied")
def test_loss_and_gradients_match_torch_autograd(reference, tmp_path):
    from safetensors.numpy import load_file

    cfg, model, _, st_dir = reference
    params, cfg = mamba2.load_checkpoint(st_dir)
    tokens = _tokens(cfg, batch=2, seq=37, seed=7)  # not a multiple of the chunk (16 or 8)
    model.zero_grad()
    out = model(torch.as_tensor(tokens, dtype=torch.long), labels=torch.as_tensor(tokens, dtype=torch.long))
    out.loss.backward()
    ref_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}

    # one compiled program (eager, every operation of the loss and its gradient would compile on its own)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(mamba2.loss, has_aux=True), static_argnums=1)(
        params, cfg, jnp.asarray(tokens))
    assert_close(loss, out.loss.item(), rtol=LOSS_PARITY_RTOL, name="loss")
    assert float(metrics.tokens) == 2 * 36
    # Our gradient PyTree in torch's names and layouts: save_checkpoint's mapping, applied to the gradients.
    mamba2.save_checkpoint(grads, cfg, tmp_path / "grads")
    ours = load_file(tmp_path / "grads" / "model.safetensors")
    ref_grads = {k: v for k, v in ref_grads.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    assert sorted(ours) == sorted(ref_grads)
    for name, ref in ref_grads.items():
        err = np.linalg.norm(ours[name].astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64))
        assert err <= GRAD_RTOL, f"{name}: relative gradient error {err:.2e} > {GRAD_RTOL}"

"""Mamba-2 config and checkpoint I/O: presets, both JSON formats, both weight formats, bad files."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import mamba2
from models.mamba2 import CheckpointError, Mamba2Config

torch = pytest.importorskip("torch")

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name,millions", [("130m", 129.0), ("370m", 368.3), ("780m", 780.2),
                                           ("1.3b", 1343.8), ("2.7b", 2702.6)])
def test_preset_parameter_counts(name, millions):
    cfg = Mamba2Config.preset(name)
    assert abs(cfg.num_params() / 1e6 - millions) < 0.1
    assert cfg.padded_vocab_size == 50288 and cfg.d_state == 128 and cfg.headdim == 64
    assert Mamba2Config.preset(f"state-spaces/mamba2-{name}") == cfg


def test_preset_shapes_match_reference_table():
    cfg = Mamba2Config.preset("130m")
    assert (cfg.d_in_proj, cfg.d_model) == (3352, 768) and cfg.conv_dim == 1792 and cfg.nheads == 24


def test_config_validation():
    Mamba2Config(**TINY)  # the documented small model is valid
    hash(Mamba2Config(**TINY))
    cases = [
        (dict(headdim=24), "heads·headdim must equal d_inner"),
        (dict(ngroups=3), "must be a multiple of ngroups"),
        (dict(d_intermediate=128), "MLP blocks"),
        (dict(bias=True), "bias=True is not supported"),
        (dict(norm_before_gate=True), "norm_before_gate=True is not supported"),
        (dict(d_state=0), "d_state must be a positive integer"),
        (dict(dt_limit=(0.5, 0.1)), "dt_limit must be"),
    ]
    for override, message in cases:
        with pytest.raises(ValueError, match=message):
            Mamba2Config(**{**TINY, **override})
    with pytest.raises(ValueError, match="unknown Mamba-2 preset"):
        Mamba2Config.preset("7b")
    assert Mamba2Config(**{**TINY, "dt_limit": [0.0, 1.0]}).dt_limit == (0.0, 1.0)


def test_config_json_formats(tmp_path):
    ssm = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
           "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True}
    (tmp_path / "a.json").write_text(json.dumps(ssm))
    assert Mamba2Config.from_json(tmp_path / "a.json") == Mamba2Config.preset("130m")

    transformers = pytest.importorskip("transformers")
    cfg = Mamba2Config(**{**TINY, "ngroups": 2, "tie_embeddings": False})
    transformers.Mamba2Config(**cfg.to_transformers_dict()).to_json_file(tmp_path / "b.json")
    back = Mamba2Config.from_json(tmp_path / "b.json")
    assert (back.d_model, back.nheads, back.ngroups, back.padded_vocab_size, back.tie_embeddings) == (
        cfg.d_model, cfg.nheads, cfg.ngroups, cfg.padded_vocab_size, False)
    (tmp_path / "c.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    assert Mamba2Config.from_json(tmp_path / "c.json") == cfg

    bad = dict(ssm, ssm_cfg={"layer": "Mamba1"})
    (tmp_path / "d.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="only 'Mamba2' models"):
        Mamba2Config.from_json(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps(dict(ssm, attn_layer_idx=[3])))
    with pytest.raises(ValueError, match="attention layers"):
        Mamba2Config.from_json(tmp_path / "e.json")
    (tmp_path / "f.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Mamba2Config.from_json(tmp_path / "f.json")


# ------------------------------------------------------------------------------ weights
def _mamba_ssm_state_dict(cfg: Mamba2Config, seed=0, unpadded_vocab=False):
    """A random state dict with mamba_ssm names, fp16 matrices and fp32 A_log/D/dt_bias like the real ones."""
    g = torch.Generator().manual_seed(seed)
    rows = cfg.vocab_size if unpadded_vocab else cfg.padded_vocab_size
    sd = {"backbone.embedding.weight": torch.randn(rows, cfg.d_model, generator=g).half(),
          "backbone.norm_f.weight": torch.randn(cfg.d_model, generator=g).half()}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = torch.randn(cfg.d_model, generator=g).half()
        sd[p + "mixer.in_proj.weight"] = torch.randn(cfg.d_in_proj, cfg.d_model, generator=g).half()
        sd[p + "mixer.conv1d.weight"] = torch.randn(cfg.conv_dim, 1, cfg.d_conv, generator=g).half()
        sd[p + "mixer.conv1d.bias"] = torch.randn(cfg.conv_dim, generator=g).half()
        sd[p + "mixer.dt_bias"] = torch.randn(cfg.nheads, generator=g)
        sd[p + "mixer.A_log"] = torch.randn(cfg.nheads, generator=g)
        sd[p + "mixer.D"] = torch.randn(cfg.nheads, generator=g)
        sd[p + "mixer.norm.weight"] = torch.randn(cfg.d_inner, generator=g).half()
        sd[p + "mixer.out_proj.weight"] = torch.randn(cfg.d_model, cfg.d_inner, generator=g).half()
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # tied, as mamba_ssm saves it
    return sd


def _write_bin(path, cfg, sd):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    torch.save(sd, path / "pytorch_model.bin")
    return path


@pytest.fixture
def bin_ckpt(tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(cfg)
    return _write_bin(tmp_path / "bin", cfg, sd), cfg, sd


def test_bin_loads_every_tensor_in_place(bin_ckpt):
    path, cfg, sd = bin_ckpt
    params, loaded_cfg = mamba2.load_checkpoint(path)
    assert loaded_cfg == cfg
    np.testing.assert_array_equal(params.embedding, sd["backbone.embedding.weight"].numpy())
    assert params.embedding.dtype == jnp.float16 and params.layers.A_log.dtype == jnp.float32
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        np.testing.assert_array_equal(params.layers.in_proj[i], sd[p + "mixer.in_proj.weight"].numpy())
        np.testing.assert_array_equal(params.layers.out_proj[i], sd[p + "mixer.out_proj.weight"].numpy())
        np.testing.assert_array_equal(params.layers.conv_weight[i], sd[p + "mixer.conv1d.weight"].numpy()[:, 0].T)
        np.testing.assert_array_equal(params.layers.conv_bias[i], sd[p + "mixer.conv1d.bias"].numpy())
        np.testing.assert_array_equal(params.layers.A_log[i], sd[p + "mixer.A_log"].numpy())
        np.testing.assert_array_equal(params.layers.dt_bias[i], sd[p + "mixer.dt_bias"].numpy())
        np.testing.assert_array_equal(params.layers.D[i], sd[p + "mixer.D"].numpy())
        np.testing.assert_array_equal(params.layers.gate_norm[i], sd[p + "mixer.norm.weight"].numpy())
        np.testing.assert_array_equal(params.layers.norm[i], sd[p + "norm.weight"].numpy())
    assert params.lm_head is None
    p32, _ = mamba2.load_checkpoint(path, dtype=jnp.float32)
    assert p32.layers.in_proj.dtype == jnp.float32
    np.testing.assert_array_equal(p32.layers.in_proj, params.layers.in_proj.astype(jnp.float32))


def test_bf16_and_noncontiguous_tensors(tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = {k: (v.to(torch.bfloat16) if v.dtype == torch.float16 else v) for k, v in _mamba_ssm_state_dict(cfg).items()}
    # A transposed view: stored with non-trivial strides in the archive.
    w = sd["backbone.layers.1.mixer.out_proj.weight"]
    sd["backbone.layers.1.mixer.out_proj.weight"] = w.t().contiguous().t()
    path = _write_bin(tmp_path / "bf16", cfg, sd)
    params, _ = mamba2.load_checkpoint(path)
    assert params.layers.in_proj.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(params.layers.out_proj[1], np.float32), w.float().numpy())


def test_unpadded_vocab_is_padded(tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(cfg, unpadded_vocab=True)
    del sd["lm_head.weight"]
    params, _ = mamba2.load_checkpoint(_write_bin(tmp_path / "u", cfg, sd))
    assert params.embedding.shape == (cfg.padded_vocab_size, cfg.d_model)
    assert not np.asarray(params.embedding[cfg.vocab_size:]).any()


def test_save_load_round_trip_and_transformers(tmp_path, bin_ckpt):
    transformers = pytest.importorskip("transformers")
    for tie in (True, False):
        cfg = Mamba2Config(**{**TINY, "ngroups": 2, "tie_embeddings": tie})
        params = mamba2.init_params(cfg, jax.random.key(0))
        out = tmp_path / f"rt{tie}"
        mamba2.save_checkpoint(params, cfg, out)
        back, cfg_back = mamba2.load_checkpoint(out)
        assert cfg_back.padded_vocab_size == cfg.padded_vocab_size and cfg_back.tie_embeddings == tie
        jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
        model, info = transformers.Mamba2ForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        np.testing.assert_array_equal(model.backbone.layers[1].mixer.conv1d.weight.detach().numpy()[:, 0].T,
                                      params.layers.conv_weight[1])


# ------------------------------------------------------------------------------ bad checkpoints
def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(cfg)
    del sd["backbone.layers.1.mixer.D"]
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.layers\.1\.mixer\.D"):
        mamba2.load_checkpoint(_write_bin(tmp_path / "m", cfg, sd))
    sd = _mamba_ssm_state_dict(cfg)
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: backbone\.layers\.0\.mixer\.extra"):
        mamba2.load_checkpoint(_write_bin(tmp_path / "x", cfg, sd))
    sd = _mamba_ssm_state_dict(cfg)
    sd["backbone.layers.1.mixer.in_proj.weight"] = torch.zeros(cfg.d_in_proj + 1, cfg.d_model)
    with pytest.raises(CheckpointError, match=r"tensor backbone\.layers\.1\.mixer\.in_proj\.weight has shape "
                                              r"\(149, 32\), expected \(148, 32\)"):
        mamba2.load_checkpoint(_write_bin(tmp_path / "s", cfg, sd))


def test_truncated_and_corrupt_files(tmp_path, bin_ckpt):
    path, cfg, _ = bin_ckpt
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        mamba2.load_checkpoint(path)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02garbage, not a zip archive")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        mamba2.load_checkpoint(path)

    st = tmp_path / "st"
    mamba2.save_checkpoint(mamba2.init_params(cfg, jax.random.key(0)), cfg, st)
    raw = (st / "model.safetensors").read_bytes()
    (st / "model.safetensors").write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        mamba2.load_checkpoint(st)
    (st / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        mamba2.load_checkpoint(st)
    (st / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        mamba2.load_checkpoint(st)
    with pytest.raises(CheckpointError, match="does not exist"):
        mamba2.load_checkpoint(tmp_path / "nowhere")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_executes_nothing(tmp_path):
    cfg = Mamba2Config(**TINY)
    path = tmp_path / "evil"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    marker = tmp_path / "pwned"
    for payload in (_Evil(marker), {"backbone.embedding.weight": _Evil(marker)}):
        with zipfile.ZipFile(path / "pytorch_model.bin", "w") as z:
            z.writestr("archive/data.pkl", pickle.dumps(payload, protocol=2))
        with pytest.raises(CheckpointError, match="refusing to load global (posix|os)"):
            mamba2.load_checkpoint(path)
        assert not marker.exists()

"""Mamba2Config: presets and their parameter counts, validation, both config.json formats."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from ssdkit.models.mamba2 import Mamba2Config
from ssdkit.models.mamba2.params import init_params

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)

#: the reference table: (d_model, n_layer, heads, in_proj rows, conv_dim, params in millions)
PUBLISHED = {
    "130m": (768, 24, 24, 3352, 1792, 129.0),
    "370m": (1024, 48, 32, 4384, 2304, 368.3),
    "780m": (1536, 48, 48, 6448, 3328, 780.2),
    "1.3b": (2048, 48, 64, 8512, 4352, 1343.8),
    "2.7b": (2560, 64, 80, 10576, 5376, 2702.6),
}

#: mamba_ssm's config.json of state-spaces/mamba2-130m, verbatim
MAMBA_SSM_130M = {"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
                  "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
                  "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 16,
                  "tie_embeddings": True}


def _write(tmp_path, data, name="config.json"):
    f = tmp_path / name
    f.write_text(data if isinstance(data, str) else json.dumps(data))
    return f


# ------------------------------------------------------------------------------ presets and sizes
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_match_the_reference_table(name):
    d_model, n_layer, heads, in_proj, conv_dim, millions = PUBLISHED[name]
    cfg = Mamba2Config.preset(name)
    assert (cfg.d_model, cfg.n_layer, cfg.nheads, cfg.d_in_proj, cfg.conv_dim) == (
        d_model, n_layer, heads, in_proj, conv_dim)
    assert (cfg.d_state, cfg.headdim, cfg.ngroups, cfg.expand, cfg.d_conv, cfg.chunk_size) == (128, 64, 1, 2, 4, 256)
    assert cfg.vocab_size == 50277 and cfg.padded_vocab_size == 50288 and cfg.tie_embeddings
    assert abs(cfg.num_params() / 1e6 - millions) < 0.1
    for alias in (f"mamba2-{name}", f"state-spaces/mamba2-{name}", name.upper()):
        assert Mamba2Config.preset(alias) == cfg


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown Mamba-2 preset '7b'.*130m"):
        Mamba2Config.preset("7b")


@pytest.mark.parametrize("extra", [{}, {"ngroups": 2}, {"tie_embeddings": False}, {"vocab_size": 64}])
def test_num_params_counts_the_pytree_exactly(extra):
    cfg = Mamba2Config(**{**TINY, **extra})
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    assert cfg.num_params() == sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))


def test_derived_sizes_of_a_small_config():
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=64, d_state=16, headdim=16, chunk_size=16)
    assert (cfg.d_inner, cfg.nheads, cfg.conv_dim, cfg.d_in_proj, cfg.padded_vocab_size) == (
        128, 8, 128 + 32, 256 + 32 + 8, 64)
    cfg = Mamba2Config(**TINY, ngroups=2)
    assert (cfg.nheads, cfg.conv_dim, cfg.d_in_proj, cfg.padded_vocab_size) == (4, 64 + 32, 128 + 32 + 4, 64)
    assert Mamba2Config(**{**TINY, "pad_vocab_size_multiple": 1}).padded_vocab_size == 50


# ------------------------------------------------------------------------------ construction and validation
def test_required_keyword_fields_and_published_defaults():
    with pytest.raises(TypeError):
        Mamba2Config()  # d_model, n_layer, vocab_size are required
    with pytest.raises(TypeError):
        Mamba2Config(768, 24, 50277)  # keywords only
    cfg = Mamba2Config(d_model=768, n_layer=24, vocab_size=50277)
    assert (cfg.d_intermediate, cfg.pad_vocab_size_multiple, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim,
            cfg.ngroups, cfg.chunk_size) == (0, 16, 128, 4, 2, 64, 1, 256)
    assert (cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, cfg.dt_limit, cfg.A_init_range, cfg.norm_eps) == (
        0.001, 0.1, 1e-4, (0.0, math.inf), (1.0, 16.0), 1e-5)
    assert (cfg.tie_embeddings, cfg.conv_bias, cfg.bias, cfg.rmsnorm, cfg.norm_before_gate,
            cfg.residual_in_fp32) == (True, True, False, True, False, True)


def test_config_is_frozen_hashable_and_a_static_jit_argument():
    cfg = Mamba2Config(**{**TINY, "dt_limit": [0.0, 1.0], "A_init_range": [1, 4]})
    assert cfg.dt_limit == (0.0, 1.0) and isinstance(cfg.dt_limit, tuple)
    assert cfg.A_init_range == (1.0, 4.0) and isinstance(cfg.A_init_range, tuple)
    assert hash(cfg) == hash(Mamba2Config(**{**TINY, "dt_limit": (0.0, 1.0), "A_init_range": (1.0, 4.0)}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64
    f = jax.jit(lambda x, c: x * c.nheads, static_argnums=1)
    assert int(f(np.int32(2), cfg)) == 2 * cfg.nheads


@pytest.mark.parametrize("override,message", [
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(n_layer=-1), "n_layer must be a positive integer"),
    (dict(vocab_size=50.5), "vocab_size must be a positive integer"),
    (dict(d_state=True), "d_state must be a positive integer"),
    (dict(chunk_size=0), "chunk_size must be a positive integer"),
    (dict(headdim=24), "heads·headdim must equal d_inner"),
    (dict(ngroups=3), "must be a multiple of ngroups=3"),
    (dict(d_intermediate=128), "d_intermediate=128: MLP blocks .* not supported"),
    (dict(bias=True), "bias=True is not supported"),
    (dict(conv_bias=False), "conv_bias=False is not supported"),
    (dict(rmsnorm=False), "rmsnorm=False is not supported"),
    (dict(norm_before_gate=True), "norm_before_gate=True is not supported"),
    (dict(residual_in_fp32=False), "residual_in_fp32=False is not supported"),
    (dict(tie_embeddings="yes"), "tie_embeddings must be True or False"),
    (dict(dt_limit=(0.5, 0.1)), "dt_limit must be .* 0 <= low < high"),
    (dict(dt_limit=(-1.0, 1.0)), "dt_limit must be .* 0 <= low < high"),
    (dict(dt_limit=(0.0, 1.0, 2.0)), r"dt_limit must be a \(low, high\) pair"),
    (dict(dt_limit=0.5), r"dt_limit must be a \(low, high\) pair"),
    (dict(dt_limit=("a", 1.0)), "dt_limit must be a pair of numbers"),
    (dict(A_init_range=(0.0, 16.0)), "A_init_range must satisfy"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min <= dt_max"),
    (dict(dt_init_floor=-1.0), "dt_init_floor must be >= 0"),
    (dict(norm_eps=0.0), "norm_eps must be positive"),
    (dict(norm_eps=math.nan), "norm_eps must be a finite number"),
])
def test_validation_errors(override, message):
    with pytest.raises(ValueError, match=message):
        Mamba2Config(**{**TINY, **override})


def test_valid_edge_values():
    assert Mamba2Config(**{**TINY, "dt_limit": (0.0, 0.5)}).dt_limit == (0.0, 0.5)
    assert Mamba2Config(**{**TINY, "ngroups": 4}).nheads == 4
    assert Mamba2Config(**{**TINY, "dt_limit": [0, {"__float__": "Infinity"}]}).dt_limit == (0.0, math.inf)


# ------------------------------------------------------------------------------ mamba_ssm config.json
def test_mamba_ssm_json_of_the_published_checkpoint(tmp_path):
    assert Mamba2Config.from_json(_write(tmp_path, MAMBA_SSM_130M)) == Mamba2Config.preset("130m")
    big = dict(MAMBA_SSM_130M, d_model=2560, n_layer=64)
    assert Mamba2Config.from_json(_write(tmp_path, big)) == Mamba2Config.preset("2.7b")


def test_mamba_ssm_json_with_ssm_settings(tmp_path):
    data = dict(MAMBA_SSM_130M, d_model=32, n_layer=2, vocab_size=50, tie_embeddings=False,
                ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 2, "chunk_size": 8,
                         "dt_limit": [0.0, 0.2], "A_init_range": [1, 8], "use_mem_eff_path": False})
    cfg = Mamba2Config.from_json(_write(tmp_path, data))
    assert cfg == Mamba2Config(**TINY, ngroups=2, dt_limit=(0.0, 0.2), A_init_range=(1.0, 8.0),
                               tie_embeddings=False)
    assert (cfg.d_conv, cfg.expand, cfg.norm_eps) == (4, 2, 1e-5)  # not in ssm_cfg: defaults


@pytest.mark.parametrize("tie,extra", [(True, {}), (False, {"ngroups": 2, "dt_limit": (0.001, 0.5)})])
def test_mamba_ssm_dict_round_trip(tmp_path, tie, extra):
    cfg = Mamba2Config(**TINY, tie_embeddings=tie, **extra)
    text = json.dumps(cfg.to_mamba_ssm_dict(), allow_nan=False)  # strict JSON: no Infinity
    assert Mamba2Config.from_json(_write(tmp_path, text)) == cfg


@pytest.mark.parametrize("change,message", [
    (dict(ssm_cfg={"layer": "Mamba1"}), "ssm_cfg.layer is 'Mamba1'; only 'Mamba2' models"),
    (dict(ssm_cfg={}), "ssm_cfg names no layer"),
    (dict(attn_layer_idx=[3]), r"attn_layer_idx=\[3\]: hybrid models with attention layers"),
    (dict(d_intermediate=512), "d_intermediate=512"),
    (dict(rms_norm=False), "rmsnorm=False is not supported"),
    (dict(ssm_cfg={"layer": "Mamba2", "D_has_hdim": True}), "D_has_hdim"),
    (dict(ssm_cfg={"layer": "Mamba2", "d_ssm": 512}), "d_ssm=512"),
    (dict(ssm_cfg={"layer": "Mamba2", "frobnicate": 1}), r"unknown ssm_cfg fields \['frobnicate'\]"),
    (dict(ssm_cfg={"layer": "Mamba2", "headdim": 100}), "heads·headdim must equal d_inner"),
])
def test_mamba_ssm_json_errors(tmp_path, change, message):
    f = _write(tmp_path, dict(MAMBA_SSM_130M, **change))
    with pytest.raises(ValueError, match=message) as err:
        Mamba2Config.from_json(f)
    assert str(f) in str(err.value)


def test_json_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        Mamba2Config.from_json(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Mamba2Config.from_json(_write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="must hold a JSON object"):
        Mamba2Config.from_json(_write(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match="neither a mamba_ssm config"):
        Mamba2Config.from_json(_write(tmp_path, {"foo": 1}))
    with pytest.raises(ValueError, match="lacks n_layer"):
        Mamba2Config.from_json(_write(tmp_path, {"d_model": 32, "vocab_size": 50}))


# ------------------------------------------------------------------------------ transformers config.json
def _hf_130m(**change):
    """transformers' config.json for a mamba2-130m conversion, written by hand."""
    data = {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 768,
            "num_hidden_layers": 24, "num_heads": 24, "head_dim": 64, "state_size": 128, "n_groups": 1,
            "expand": 2, "conv_kernel": 4, "chunk_size": 256, "vocab_size": 50288, "layer_norm_epsilon": 1e-5,
            "time_step_limit": [0.0, {"__float__": "Infinity"}], "time_step_min": 0.001, "time_step_max": 0.1,
            "time_step_floor": 0.0001, "tie_word_embeddings": True, "residual_in_fp32": True, "use_bias": False,
            "use_conv_bias": True, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    data.update(change)
    return data


def test_transformers_json_written_by_hand(tmp_path):
    cfg = Mamba2Config.from_json(_write(tmp_path, _hf_130m()))
    ref = Mamba2Config.preset("130m")
    assert cfg.padded_vocab_size == 50288 and cfg.num_params() == ref.num_params()
    assert dataclasses.replace(cfg, vocab_size=50277) == ref
    # Python's json writes Infinity bare; older transformers did too.
    text = json.dumps(_hf_130m(time_step_limit=[0.0, math.inf], tie_word_embeddings=False))
    cfg = Mamba2Config.from_json(_write(tmp_path, text))
    assert cfg.dt_limit == (0.0, math.inf) and not cfg.tie_embeddings


def test_transformers_json_missing_keys_take_transformers_defaults(tmp_path):
    data = {"model_type": "mamba2", "hidden_size": 512, "num_hidden_layers": 2, "vocab_size": 100,
            "num_heads": 16}
    cfg = Mamba2Config.from_json(_write(tmp_path, data))
    # transformers.Mamba2Config defaults: n_groups=8, head_dim=64, state_size=128, no tying.
    assert (cfg.ngroups, cfg.headdim, cfg.d_state, cfg.tie_embeddings) == (8, 64, 128, False)
    # vocab 100 is not a multiple of 16: kept as is (it is transformers' already padded vocabulary).
    assert (cfg.vocab_size, cfg.pad_vocab_size_multiple, cfg.padded_vocab_size) == (100, 1, 100)


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=12), r"num_heads·head_dim = 12·64 = 768 must equal expand·hidden_size = 2·768 = 1536"),
    (dict(model_type="mamba"), "model_type is 'mamba'; only 'mamba2'"),
    (dict(use_bias=True), "bias=True is not supported"),
    (dict(n_groups=5), "multiple of ngroups=5"),
    (dict(time_step_limit=[0.1, 0.01]), "dt_limit must be"),
])
def test_transformers_json_errors(tmp_path, change, message):
    f = _write(tmp_path, _hf_130m(**change))
    with pytest.raises(ValueError, match=message):
        Mamba2Config.from_json(f)
    with pytest.raises(ValueError, match="lacks num_hidden_layers"):
        Mamba2Config.from_json(_write(tmp_path, {"model_type": "mamba2", "hidden_size": 64, "vocab_size": 64}))


def test_transformers_config_objects(tmp_path):
    transformers = pytest.importorskip("transformers")
    # A config built by transformers itself, written by its own to_json_file.
    hf = transformers.Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
                                   n_groups=2, vocab_size=64, chunk_size=8, tie_word_embeddings=True,
                                   time_step_limit=(0.0, 0.5))
    hf.to_json_file(tmp_path / "hf.json")
    cfg = Mamba2Config.from_json(tmp_path / "hf.json")
    assert cfg == Mamba2Config(d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=16, ngroups=2, chunk_size=8,
                               dt_limit=(0.0, 0.5))

    # Ours -> transformers: an equivalent transformers config, and back.
    for extra in ({}, {"ngroups": 2, "tie_embeddings": False}, {"vocab_size": 64, "dt_limit": (0.0, 0.3)}):
        ours = Mamba2Config(**{**TINY, **extra})
        d = ours.to_transformers_dict()
        assert d["model_type"] == "mamba2" and d["architectures"] == ["Mamba2ForCausalLM"]
        assert (d["bos_token_id"], d["eos_token_id"], d["pad_token_id"]) == (0, 0, 0)
        hf = transformers.Mamba2Config(**d)
        assert (hf.hidden_size, hf.num_hidden_layers, hf.num_heads, hf.head_dim, hf.state_size, hf.n_groups,
                hf.expand, hf.conv_kernel, hf.chunk_size, hf.vocab_size, hf.tie_word_embeddings) == (
            ours.d_model, ours.n_layer, ours.nheads, ours.headdim, ours.d_state, ours.ngroups, ours.expand,
            ours.d_conv, ours.chunk_size, ours.padded_vocab_size, ours.tie_embeddings)
        assert tuple(hf.time_step_limit) == ours.dt_limit and hf.layer_norm_epsilon == ours.norm_eps
        hf.to_json_file(tmp_path / "back.json")
        _write(tmp_path, ours.to_transformers_json(), "ours.json")
        for name in ("back.json", "ours.json"):
            back = Mamba2Config.from_json(tmp_path / name)
            # transformers stores the padded vocabulary, so vocab_size itself may change.
            assert dataclasses.replace(back, vocab_size=ours.vocab_size,
                                       pad_vocab_size_multiple=ours.pad_vocab_size_multiple) == ours
            assert back.padded_vocab_size == ours.padded_vocab_size

"""Mamba-2 checkpoint I/O: mamba_ssm .bin (read without torch), transformers safetensors, saving for
transformers, and every kind of bad checkpoint (missing / unexpected / mis-shaped tensors, truncated,
corrupt, legacy and malicious files). Also the tokenizer helper."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from ssdkit.models import mamba2
from ssdkit.models.mamba2 import CheckpointError, Mamba2Config
from ssdkit.models.mamba2.checkpoint import LAYER_KEYS
from ssdkit.models.mamba2.params import (
    Mamba2LayerParams,
    checkpoint_shapes,
    from_checkpoint_layout,
    join_published,
    to_checkpoint_layout,
)

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)
FLOAT32_NAMES = ("mixer.dt_bias", "mixer.A_log", "mixer.D")


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def _np(t) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 included."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(dtype=torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_params_match(params, cfg: Mamba2Config, tensors: dict[str, np.ndarray]) -> None:
    """Every tensor of a checkpoint (torch names) is exactly where it belongs in ``params``."""
    tensors = dict(tensors)
    emb = tensors.pop("backbone.embedding.weight", None)
    if emb is None:
        emb = tensors.pop("backbone.embeddings.weight")
    rows = emb.shape[0]
    np.testing.assert_array_equal(np.asarray(params.embedding[:rows]), emb)
    assert not np.asarray(params.embedding[rows:]).any()  # zero padding, if any
    assert params.embedding.shape == (cfg.padded_vocab_size, cfg.d_model)
    np.testing.assert_array_equal(np.asarray(params.norm_f), tensors.pop("backbone.norm_f.weight"))
    head = tensors.pop("lm_head.weight", None)
    if cfg.tie_embeddings:
        assert params.lm_head is None
    else:
        np.testing.assert_array_equal(np.asarray(params.lm_head[: head.shape[0]]), head)
    layers = mamba2.unstack_layers(params).layers
    assert len(layers) == cfg.n_layer
    for i, lp in enumerate(layers):  # regrouped by head and group: back to the published layout, bit for bit
        host = type(lp)(**{f: np.asarray(getattr(lp, f)) for f in lp.__dataclass_fields__})
        for field, key in LAYER_KEYS.items():
            want = tensors.pop(f"backbone.layers.{i}.{key}")
            if field == "conv_weight":
                want = want[:, 0, :].T  # (conv_dim, 1, K) -> (K, conv_dim)
            np.testing.assert_array_equal(join_published(cfg, field, host), want, err_msg=f"layers[{i}].{field}")
    assert not tensors, f"tensors not checked: {sorted(tensors)}"


def test_published_layout_regrouping():
    """in_proj's rows [z | x | B | C | dt] and the conv's channels [x | B | C] land where params.py says,
    element by element (an independent check of split_published, which every loader uses)."""
    cfg = Mamba2Config(d_model=6, n_layer=1, vocab_size=8, d_state=3, headdim=2, expand=2, ngroups=2, d_conv=3)
    h, p, g, n, e = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.d_inner
    published = {k: np.arange(np.prod(v), dtype=np.float64).reshape(v) for k, v in checkpoint_shapes(cfg).items()}
    ours = from_checkpoint_layout(cfg, published)
    w, cw = published["in_proj"], published["conv_weight"]
    for head in range(h):
        for q in range(p):
            np.testing.assert_array_equal(ours["in_proj_heads"][head, q], w[head * p + q])  # z
            np.testing.assert_array_equal(ours["in_proj_heads"][head, p + q], w[e + head * p + q])  # x
            np.testing.assert_array_equal(ours["conv_x_weight"][:, head * p + q], cw[:, head * p + q])
        np.testing.assert_array_equal(ours["in_proj_dt"][head], w[2 * e + 2 * g * n + head])  # dt
    for grp in range(g):
        for m in range(n):
            np.testing.assert_array_equal(ours["in_proj_groups"][grp, m], w[2 * e + grp * n + m])  # B
            np.testing.assert_array_equal(ours["in_proj_groups"][grp, n + m], w[2 * e + g * n + grp * n + m])  # C
            np.testing.assert_array_equal(ours["conv_bc_weight"][:, grp * 2 * n + m], cw[:, e + grp * n + m])
            np.testing.assert_array_equal(ours["conv_bc_weight"][:, grp * 2 * n + n + m],
                                          cw[:, e + g * n + grp * n + m])
            np.testing.assert_array_equal(ours["conv_bc_bias"][grp * 2 * n + n + m],
                                          published["conv_bias"][e + g * n + grp * n + m])
    back = to_checkpoint_layout(cfg, Mamba2LayerParams(**ours))
    for k, v in published.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def _mamba_ssm_state_dict(torch, cfg: Mamba2Config, seed=0, unpadded_vocab=False, dtype=None):
    """A random state dict with mamba_ssm names, half-precision matrices and float32 A_log/D/dt_bias
    like the published checkpoints."""
    dtype = dtype or torch.float16
    g = torch.Generator().manual_seed(seed)
    rows = cfg.vocab_size if unpadded_vocab else cfg.padded_vocab_size

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    sd = {"backbone.embedding.weight": randn(rows, cfg.d_model)}
    for i in range(cfg.n_layer):
        p = f"backbone.layers.{i}."
        sd[p + "norm.weight"] = randn(cfg.d_model)
        sd[p + "mixer.in_proj.weight"] = randn(cfg.d_in_proj, cfg.d_model)
        sd[p + "mixer.conv1d.weight"] = randn(cfg.conv_dim, 1, cfg.d_conv)
        sd[p + "mixer.conv1d.bias"] = randn(cfg.conv_dim)
        sd[p + "mixer.dt_bias"] = randn(cfg.nheads, dt=torch.float32)
        sd[p + "mixer.A_log"] = randn(cfg.nheads, dt=torch.float32)
        sd[p + "mixer.D"] = randn(cfg.nheads, dt=torch.float32)
        sd[p + "mixer.norm.weight"] = randn(cfg.d_inner)
        sd[p + "mixer.out_proj.weight"] = randn(cfg.d_model, cfg.d_inner)
    sd["backbone.norm_f.weight"] = randn(cfg.d_model)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]  # tied: mamba_ssm saves the shared tensor
    else:
        sd["lm_head.weight"] = randn(rows, cfg.d_model)
    return sd


def _write_bin(torch, path, cfg, sd):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    torch.save(sd, path / "pytorch_model.bin")
    return path


@pytest.fixture
def bin_ckpt(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg)
    return _write_bin(torch, tmp_path / "bin", cfg, sd), cfg, sd


def _hf_model(transformers, seed=0, **kw):
    """A small random transformers Mamba2ForCausalLM (vocab already padded, as transformers stores it)."""
    import torch

    torch.manual_seed(seed)
    args = dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, n_groups=1,
                vocab_size=64, chunk_size=8, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                pad_token_id=0)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**{**args, **kw}))
    with torch.no_grad():  # non-trivial norms, D and biases so a misplaced tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------ mamba_ssm .bin
def test_bin_every_tensor_lands_in_place(bin_ckpt):
    path, cfg, sd = bin_ckpt
    params, loaded_cfg = mamba2.load_checkpoint(path)
    assert loaded_cfg == cfg
    assert_params_match(params, cfg, {k: _np(v) for k, v in sd.items()})
    for field in ("embedding", "norm_f"):
        assert getattr(params, field).dtype == jnp.float16
    for field in mamba2.Mamba2LayerParams.__dataclass_fields__:
        want = jnp.float32 if field in ("dt_bias", "A_log", "D") else jnp.float16
        assert all(getattr(lp, field).dtype == want for lp in params.layers), field


def test_bin_loads_without_torch(bin_ckpt):
    """The loader never imports torch (or transformers): run it where importing them fails."""
    path, cfg, sd = bin_ckpt
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import numpy as np\n"
        "from ssdkit.models import mamba2\n"
        f"params, cfg = mamba2.load_checkpoint({str(path)!r})\n"
        "print(cfg.n_layer, float(np.asarray(mamba2.stack_layers(params).layers.A_log, np.float64).sum()))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr
    a_log = sum(float(sd[f"backbone.layers.{i}.mixer.A_log"].double().sum()) for i in range(cfg.n_layer))
    n_layer, total = out.stdout.split()
    assert int(n_layer) == cfg.n_layer and float(total) == pytest.approx(a_log, rel=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bin_dtype_casts_matrices_only(bin_ckpt, dtype):
    path, cfg, sd = bin_ckpt
    ref, _ = mamba2.load_checkpoint(path, stacked=True)
    params, _ = mamba2.load_checkpoint(path, dtype=dtype, stacked=True)
    assert params.embedding.dtype == dtype and params.layers.in_proj_heads.dtype == dtype
    assert params.layers.gate_norm.dtype == dtype and params.norm_f.dtype == dtype
    assert params.layers.A_log.dtype == params.layers.D.dtype == params.layers.dt_bias.dtype == jnp.float32
    np.testing.assert_array_equal(params.layers.in_proj_heads, ref.layers.in_proj_heads.astype(dtype))
    np.testing.assert_array_equal(params.layers.A_log, ref.layers.A_log)
    with pytest.raises(ValueError, match="dtype must be one of"):
        mamba2.load_checkpoint(path, dtype=jnp.int8)


def test_bin_untied_two_groups(torch, tmp_path):
    cfg = Mamba2Config(**TINY, ngroups=2, tie_embeddings=False)
    sd = _mamba_ssm_state_dict(torch, cfg, seed=1)
    params, loaded = mamba2.load_checkpoint(_write_bin(torch, tmp_path / "g2", cfg, sd))
    assert loaded == cfg and params.lm_head is not None
    assert_params_match(params, cfg, {k: _np(v) for k, v in sd.items()})


def test_bin_bfloat16_parameters_and_strided_tensors(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg, dtype=torch.bfloat16)
    # Stored with non-trivial strides (a transposed view) and as an nn.Parameter.
    w = sd["backbone.layers.1.mixer.out_proj.weight"]
    sd["backbone.layers.1.mixer.out_proj.weight"] = w.t().contiguous().t()
    assert not sd["backbone.layers.1.mixer.out_proj.weight"].is_contiguous()
    sd["backbone.layers.0.mixer.D"] = torch.nn.Parameter(sd["backbone.layers.0.mixer.D"])
    # Several tensors sharing one storage at different offsets.
    flat = torch.randn(2 * cfg.conv_dim, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    sd["backbone.layers.0.mixer.conv1d.bias"], sd["backbone.layers.1.mixer.conv1d.bias"] = flat.split(cfg.conv_dim)
    params, _ = mamba2.load_checkpoint(_write_bin(torch, tmp_path / "bf16", cfg, sd))
    assert params.layers[0].in_proj_heads.dtype == jnp.bfloat16
    assert_params_match(params, cfg, {k: _np(v) for k, v in sd.items()})


def test_bin_unpadded_vocabulary_is_zero_padded(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg, unpadded_vocab=True)
    params, _ = mamba2.load_checkpoint(_write_bin(torch, tmp_path / "u", cfg, sd))
    assert params.embedding.shape == (64, cfg.d_model) and cfg.vocab_size == 50
    assert_params_match(params, cfg, {k: _np(v) for k, v in sd.items()})


def test_bin_without_lm_head_when_tied(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg)
    del sd["lm_head.weight"]
    params, _ = mamba2.load_checkpoint(_write_bin(torch, tmp_path / "nohead", cfg, sd))
    assert params.lm_head is None
    assert_params_match(params, cfg, {k: _np(v) for k, v in sd.items()})


# ------------------------------------------------------------------------------ transformers safetensors
@pytest.mark.parametrize("kw", [{}, {"n_groups": 2, "tie_word_embeddings": False}])
def test_transformers_save_pretrained_loads_exactly(transformers, tmp_path, kw):
    model = _hf_model(transformers, **kw)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    params, cfg = mamba2.load_checkpoint(tmp_path / "hf")
    assert (cfg.padded_vocab_size, cfg.ngroups, cfg.tie_embeddings) == (
        64, kw.get("n_groups", 1), kw.get("tie_word_embeddings", True))
    assert params.layers[0].in_proj_heads.dtype == jnp.float32
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        np.testing.assert_array_equal(sd.pop("lm_head.weight"), sd["backbone.embeddings.weight"])
    assert_params_match(params, cfg, sd)


def test_transformers_sharded_safetensors(transformers, tmp_path):
    model = _hf_model(transformers, seed=2)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    params, cfg = mamba2.load_checkpoint(tmp_path / "sharded")
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight")
    assert_params_match(params, cfg, sd)


# ------------------------------------------------------------------------------ save_checkpoint
def _random_params(cfg: Mamba2Config, seed: int = 0, dtype=jnp.float32):
    """Params of ``init_params``' structure, shapes and dtypes, with values drawn by numpy (the files are
    under test, not the initialisation: nothing compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: mamba2.init_params(cfg, jax.random.key(0), dtype))
    return jax.tree_util.tree_map(lambda t: jnp.asarray(rng.standard_normal(t.shape).astype(t.dtype)), shapes)


@pytest.mark.parametrize("tie,ngroups,dtype", [(True, 1, jnp.float32), (False, 2, jnp.float32),
                                               (True, 2, jnp.bfloat16)])
def test_save_load_round_trip_is_exact(tmp_path, tie, ngroups, dtype):
    cfg = Mamba2Config(**TINY, ngroups=ngroups, tie_embeddings=tie)
    params = _random_params(cfg, 0, dtype)
    mamba2.save_checkpoint(params, cfg, tmp_path / "rt")
    back, cfg_back = mamba2.load_checkpoint(tmp_path / "rt")
    assert cfg_back.padded_vocab_size == cfg.padded_vocab_size
    assert dataclasses.replace(cfg_back, vocab_size=cfg.vocab_size, pad_vocab_size_multiple=16) == cfg
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # stacked params save the same
    mamba2.save_checkpoint(mamba2.stack_layers(params), cfg, tmp_path / "rt2")
    assert (tmp_path / "rt2" / "model.safetensors").read_bytes() == (tmp_path / "rt" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("tie,ngroups", [(True, 1), (False, 2)])
def test_save_checkpoint_loads_in_transformers(transformers, tmp_path, tie, ngroups):
    cfg = Mamba2Config(**TINY, ngroups=ngroups, tie_embeddings=tie)
    params = _random_params(cfg, 1)
    mamba2.save_checkpoint(params, cfg, tmp_path / "ours")
    model, info = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (model.config.n_groups, model.config.vocab_size, model.config.tie_word_embeddings) == (ngroups, 64, tie)
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    head = sd.pop("lm_head.weight")
    np.testing.assert_array_equal(head, np.asarray(params.embedding if tie else params.lm_head))
    if not tie:
        sd["lm_head.weight"] = head
    assert_params_match(params, cfg, sd)


def test_save_checkpoint_rejects_inconsistent_params(tmp_path):
    cfg = Mamba2Config(**TINY)
    params = _random_params(cfg)
    with pytest.raises(ValueError, match=r"params.layers\[0\].in_proj_groups has shape"):
        mamba2.save_checkpoint(params, dataclasses.replace(cfg, d_state=16), tmp_path / "a")
    with pytest.raises(ValueError, match="ties the embeddings but params.lm_head is set"):
        mamba2.save_checkpoint(dataclasses.replace(params, lm_head=params.embedding), cfg, tmp_path / "b")
    with pytest.raises(ValueError, match="untied embeddings but params.lm_head is None"):
        mamba2.save_checkpoint(params, dataclasses.replace(cfg, tie_embeddings=False), tmp_path / "c")


# ------------------------------------------------------------------------------ mismatching checkpoints
def test_missing_tensors_are_named(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg)
    del sd["backbone.layers.1.mixer.D"], sd["backbone.norm_f.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.layers\.1\.mixer\.D, "
                                              r"backbone\.norm_f\.weight"):
        mamba2.load_checkpoint(_write_bin(torch, tmp_path / "m", cfg, sd))
    # an untied config needs lm_head
    cfg = Mamba2Config(**TINY, tie_embeddings=False)
    sd = _mamba_ssm_state_dict(torch, cfg)
    del sd["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensors: lm_head\.weight"):
        mamba2.load_checkpoint(_write_bin(torch, tmp_path / "h", cfg, sd))
    # a checkpoint with fewer layers than its config says
    sd = _mamba_ssm_state_dict(torch, Mamba2Config(**TINY))
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.layers\.2\.mixer\.A_log, .*"
                                              r"\(9 in all\)|missing tensors: backbone\.layers\.2\."):
        mamba2.load_checkpoint(_write_bin(torch, tmp_path / "l", Mamba2Config(**{**TINY, "n_layer": 3}), sd))


def test_unexpected_tensors_are_named(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg)
    sd["backbone.layers.0.mixer.extra"] = torch.zeros(3)
    sd["backbone.layers.2.norm.weight"] = torch.zeros(cfg.d_model)
    with pytest.raises(CheckpointError, match=r"unexpected tensors: backbone\.layers\.0\.mixer\.extra, "
                                              r"backbone\.layers\.2\.norm\.weight"):
        mamba2.load_checkpoint(_write_bin(torch, tmp_path / "x", cfg, sd))


@pytest.mark.parametrize("name,shape,expected", [
    ("backbone.layers.1.mixer.in_proj.weight", (149, 32), r"\(148, 32\)"),
    ("backbone.layers.0.mixer.conv1d.weight", (80, 4), r"\(80, 1, 4\)"),
    ("backbone.layers.1.mixer.A_log", (5,), r"\(4,\)"),
    ("backbone.norm_f.weight", (31,), r"\(32,\)"),
    ("backbone.embedding.weight", (60, 32), r"\(64, 32\) or unpadded \(50, 32\)"),
    ("lm_head.weight", (64, 16), r"\(64, 32\) or unpadded \(50, 32\)"),
])
def test_misshaped_tensors_are_named(torch, tmp_path, name, shape, expected):
    cfg = Mamba2Config(**TINY)
    sd = _mamba_ssm_state_dict(torch, cfg)
    sd[name] = torch.zeros(shape, dtype=torch.float16)
    got = str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")
    pattern = rf"tensor {name.replace('.', '[.]')} has shape {got}, expected {expected}"
    with pytest.raises(CheckpointError, match=pattern):
        mamba2.load_checkpoint(_write_bin(torch, tmp_path / "s", cfg, sd))


def test_safetensors_mismatch_is_named(tmp_path):
    cfg = Mamba2Config(**TINY)
    mamba2.save_checkpoint(_random_params(cfg), cfg, tmp_path / "st")
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    (tmp_path / "st" / "config.json").write_text(json.dumps(dict(config, state_size=16)))
    with pytest.raises(CheckpointError, match=r"tensor backbone\.layers\.0\.mixer\.in_proj\.weight has shape "
                                              r"\(148, 32\), expected \(164, 32\)"):
        mamba2.load_checkpoint(tmp_path / "st")


# ------------------------------------------------------------------------------ missing / corrupt files
def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        mamba2.load_checkpoint(tmp_path / "nowhere")
    cfg = Mamba2Config(**TINY)
    st = tmp_path / "st"
    mamba2.save_checkpoint(_random_params(cfg), cfg, st)
    (st / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights: expected model.safetensors"):
        mamba2.load_checkpoint(st)
    (st / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        mamba2.load_checkpoint(st)
    (st / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        mamba2.load_checkpoint(st)


def test_truncated_safetensors(tmp_path):
    cfg = Mamba2Config(**TINY)
    st = tmp_path / "st"
    mamba2.save_checkpoint(_random_params(cfg), cfg, st)
    raw = (st / "model.safetensors").read_bytes()
    for cut in (len(raw) - 100, 40, 4):
        (st / "model.safetensors").write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
            mamba2.load_checkpoint(st)


def test_truncated_and_garbage_bin(bin_ckpt):
    path, _, _ = bin_ckpt
    binf = path / "pytorch_model.bin"
    data = binf.read_bytes()
    for cut in (len(data) // 2, len(data) - 30, 100):
        binf.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"pytorch_model\.bin .*(truncated or corrupt)"):
            mamba2.load_checkpoint(path)
    binf.write_bytes(b"garbage, neither zip nor pickle" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is not a zip archive: it is neither"):
        mamba2.load_checkpoint(path)
    # a zip whose storage bytes were corrupted: zip's CRC check catches it when the tensor is read
    raw = bytearray(data)
    pos = raw.find(b"pytorch_model/data/0") + 100  # inside the (uncompressed) embedding storage
    assert pos >= 100
    raw[pos:pos + 8] = bytes(8 - i for i in range(8))
    binf.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot read tensor backbone\.embedding\.weight"):
        mamba2.load_checkpoint(path)


def test_legacy_torch_file_asks_to_resave(torch, tmp_path):
    cfg = Mamba2Config(**TINY)
    path = tmp_path / "legacy"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg.to_mamba_ssm_dict()))
    torch.save(_mamba_ssm_state_dict(torch, cfg), path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .* re-save it with a current torch"):
        mamba2.load_checkpoint(path)


def _zip_checkpoint(tmp_path, name, pkl: bytes, storages: dict[str, bytes] | None = None):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(Mamba2Config(**TINY).to_mamba_ssm_dict()))
    with zipfile.ZipFile(path / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pkl)
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def _tensor_pickle(offset: int, size: tuple[int, ...], stride: tuple[int, ...], numel: int) -> bytes:
    """A hand-written data.pkl (as torch writes it) of {"w": tensor} with the given geometry."""
    tup = lambda xs: b"(" + b"".join(b"I%d\n" % x for x in xs) + b"t"  # noqa: E731
    return (b"\x80\x02}S'w'\nctorch._utils\n_rebuild_tensor_v2\n("
            b"(S'storage'\nctorch\nFloatStorage\nS'0'\nS'cpu'\nI%d\ntQ" % numel
            + b"I%d\n" % offset + tup(size) + tup(stride)
            + b"I00\nccollections\nOrderedDict\n)RtRs.")


def test_tensor_geometry_is_bounds_checked(tmp_path):
    storage = np.arange(4, dtype="<f4").tobytes()
    ok = _zip_checkpoint(tmp_path, "ok", _tensor_pickle(0, (2, 2), (2, 1), 4), {"0": storage})
    with pytest.raises(CheckpointError, match=r"missing tensors: .*unexpected tensors: w"):
        mamba2.load_checkpoint(ok)  # well-formed, just not a Mamba-2 state dict
    for name, geometry, message in [
        ("offset", (3, (2, 2), (2, 1), 4), "reaches element 6 of a storage of 4 elements"),
        ("stride", (0, (2, 2), (100, 1), 4), "reaches element 101 of a storage of 4 elements"),
        ("negative", (0, (2, 2), (-2, 1), 4), "invalid tensor geometry"),
        ("numel", (0, (2, 2), (2, 1), 1000), "fewer than its 1000 elements"),
    ]:
        path = _zip_checkpoint(tmp_path, name, _tensor_pickle(*geometry), {"0": storage})
        with pytest.raises(CheckpointError, match=message):
            mamba2.load_checkpoint(path)
    path = _zip_checkpoint(tmp_path, "nostorage", _tensor_pickle(0, (2, 2), (2, 1), 4))
    with pytest.raises(CheckpointError, match="storage 0 is missing from the archive"):
        mamba2.load_checkpoint(path)
    path = _zip_checkpoint(tmp_path, "nodict", pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        mamba2.load_checkpoint(path)
    path = tmp_path / "nopkl"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(Mamba2Config(**TINY).to_mamba_ssm_dict()))
    with zipfile.ZipFile(path / "pytorch_model.bin", "w") as z:
        z.writestr("archive/other", b"x")
    with pytest.raises(CheckpointError, match="expected one data.pkl"):
        mamba2.load_checkpoint(path)


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("evil,refused", [(_SystemCall, "(posix|nt|os).system"),
                                          (_Exec, "(builtins|__builtin__).exec")])
def test_malicious_pickle_executes_nothing(tmp_path, evil, refused, protocol):
    marker = tmp_path / "pwned"
    payloads = [evil(marker), {"backbone.embedding.weight": evil(marker)}, OrderedDictWith(evil(marker))]
    for n, payload in enumerate(payloads):
        path = _zip_checkpoint(tmp_path, f"evil{n}", pickle.dumps(payload, protocol=protocol))
        with pytest.raises(CheckpointError, match=f"refusing to load global {refused}"):
            mamba2.load_checkpoint(path)
        assert not marker.exists()


def OrderedDictWith(value):  # noqa: N802 - reads like a constructor in the payload list
    from collections import OrderedDict

    return OrderedDict(a=[1, {"b": value}])


# ------------------------------------------------------------------------------ tokenizer
def test_load_tokenizer(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "hello": 1, "world": 2}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "ckpt").mkdir()
    tok.save(str(tmp_path / "ckpt" / "tokenizer.json"))
    assert mamba2.load_tokenizer(tmp_path / "ckpt").encode("hello world").ids == [1, 2]
    assert mamba2.load_tokenizer(str(tmp_path / "ckpt" / "tokenizer.json")).encode("world").ids == [2]
    (tmp_path / "empty").mkdir()
    assert mamba2.load_tokenizer(tmp_path / "empty") is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        mamba2.load_tokenizer(tmp_path / "bad")

    hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, filename, **_):
        raise OSError(f"offline: cannot reach the Hub for {repo_id}/{filename}")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(ValueError, match=r"'state-spaces/mamba2-130m' is not a local directory .* offline"):
        mamba2.load_tokenizer("state-spaces/mamba2-130m")

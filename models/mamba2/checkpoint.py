"""Mamba-2 checkpoints: mamba_ssm's ``pytorch_model.bin`` and transformers' ``model.safetensors``.

Loading reads one tensor at a time straight into the per-layer layout (no second full copy of the
weights) and checks every name and shape against the config. ``.bin`` files are read WITHOUT torch:
the zip archive's pickle is replayed by a restricted unpickler that only rebuilds tensors and refuses
every other global, so a malicious checkpoint raises :class:`CheckpointError` and runs nothing.

Name mapping (``{i}`` the layer; both ``backbone.embedding.weight`` (mamba_ssm) and
``backbone.embeddings.weight`` (transformers) are accepted)::

    backbone.layers.{i}.norm.weight              layers.norm[i]
    backbone.layers.{i}.mixer.in_proj.weight     layers.in_proj_heads[i], layers.in_proj_groups[i]
                                                 (rows [z | x | B | C | dt] regrouped by head and group)
    backbone.layers.{i}.mixer.conv1d.weight      layers.conv_x_weight[i], layers.conv_bc_weight[i]
                                                 ((conv_dim, 1, K) -> (K, conv_dim), split [x | B C])
    backbone.layers.{i}.mixer.conv1d.bias        layers.conv_x_bias[i], layers.conv_bc_bias[i]
    backbone.layers.{i}.mixer.dt_bias / A_log / D   layers.dt_bias / A_log / D [i]   (float32)
    backbone.layers.{i}.mixer.norm.weight        layers.gate_norm[i]
    backbone.layers.{i}.mixer.out_proj.weight    layers.out_proj[i]       (out, in), as stored
    backbone.norm_f.weight                       norm_f
    lm_head.weight                               lm_head (untied configs only)

(``ssdkit.models.mamba2.params.split_published`` / ``join_published`` do the regrouping: a pure re-arrangement.)

Reading and writing the files themselves (safetensors, torch zip archives without torch or unpickling)
is model-agnostic: ``ssdkit.tensor_files``. This module maps and checks the Mamba-2 names and shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ssdkit.core.layers import is_per_layer
from ssdkit.models.mamba2.config import Mamba2Config
from ssdkit.models.mamba2.params import (
    CHECKPOINT_FIELDS,
    FLOAT32_LAYER_FIELDS,
    Mamba2LayerParams,
    Mamba2Params,
    checkpoint_shapes,
    join_published,
    layer_shapes,
    split_published,
)
from ssdkit.tensor_files import CheckpointError, TensorSource, name_list, open_tensor_dir, save_safetensors

__all__ = ["CheckpointError", "LAYER_KEYS", "load_checkpoint", "save_checkpoint"]


# ------------------------------------------------------------------------------ names
#: checkpoint name under ``backbone.layers.{i}.`` of each published field (``params.CHECKPOINT_FIELDS``)
LAYER_KEYS = {
    "norm": "norm.weight",
    "in_proj": "mixer.in_proj.weight",
    "conv_weight": "mixer.conv1d.weight",
    "conv_bias": "mixer.conv1d.bias",
    "dt_bias": "mixer.dt_bias",
    "A_log": "mixer.A_log",
    "D": "mixer.D",
    "gate_norm": "mixer.norm.weight",
    "out_proj": "mixer.out_proj.weight",
}
_EMBEDDING_NAMES = ("backbone.embedding.weight", "backbone.embeddings.weight")
_WEIGHT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def _checkpoint_shape(field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Checkpoint (torch) shape of one layer's tensor from our per-layer shape."""
    if field == "conv_weight":  # ours (K, conv_dim) <-> torch (conv_dim, 1, K)
        return (shape[1], 1, shape[0])
    return shape


def _to_ours(field: str, arr: np.ndarray) -> np.ndarray:
    return arr[:, 0, :].T if field == "conv_weight" else arr


def _to_torch(field: str, arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.T[:, None, :]) if field == "conv_weight" else arr


# ------------------------------------------------------------------------------ load
def load_checkpoint(path: str | Path, *, dtype=None, stacked: bool = False) -> tuple[Mamba2Params, Mamba2Config]:
    """Load the config and weights of a Mamba-2 checkpoint directory.

    The directory holds ``config.json`` (mamba_ssm or transformers format) and the weights:
    ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` (a
    ``torch.save`` zip archive, read without torch or arbitrary unpickling), in that order of preference.

    * Names: mamba_ssm (``backbone.embedding.weight``) or transformers (``backbone.embeddings.weight``).
      Every expected tensor must be there, nothing else may be, and every shape must match the config;
      otherwise :class:`CheckpointError` lists the offending tensors.
    * LM head: with tied embeddings ``lm_head.weight`` may be present or absent; when present its shape
      is checked and its values are ignored (``lm_head`` is None and the embedding is used, as in
      mamba_ssm and transformers). With untied embeddings it is required.
    * Vocabulary: an embedding (or head) stored with ``vocab_size`` rows is zero-padded to
      ``padded_vocab_size``.
    * dtype: ``None`` keeps the checkpoint's dtype of ``in_proj`` (the published checkpoints mix float16
      matrices with float32 ``A_log``/``D``/``dt_bias``) for all matrices and norms; a dtype casts them.
      ``dt_bias``, ``A_log`` and ``D`` are always float32.

    * Layout: layers come per layer (a tuple, the layout decode reads in place), each tensor moved to
      the device as it is read: peak host memory is about one tensor beyond the loaded weights.
      ``stacked=True`` gives them stacked on a leading layer axis instead (``ssdkit.models.mamba2.params``),
      each field filled layer by layer into one preallocated array: about one field beyond.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if dtype is not None:
        dtype = jnp.dtype(dtype)
        if not any(dtype == jnp.dtype(d) for d in _WEIGHT_DTYPES):
            raise ValueError(f"dtype must be one of float16, bfloat16, float32, float64 (or None), got {dtype}")
    try:
        cfg = Mamba2Config.from_json(path / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except (ValueError, TypeError, OSError) as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}") from None
    src = open_tensor_dir(path)
    try:
        return _load(src, path, cfg, dtype, stacked)
    finally:
        src.close()


def _load(src: TensorSource, path: Path, cfg: Mamba2Config, dtype, stacked: bool) -> tuple[Mamba2Params, Mamba2Config]:
    names = src.names()

    present = [n for n in _EMBEDDING_NAMES if n in names]
    emb_name = present[0] if present else _EMBEDDING_NAMES[0]
    expected = {emb_name, "backbone.norm_f.weight"}
    # Layers past what the checkpoint's tensor count could hold are missing whole: name none of their
    # tensors (a config.json claiming 10**18 layers must not build 10**19 names).
    listed = min(cfg.n_layer, len(names) // len(LAYER_KEYS) + 1)
    expected |= {f"backbone.layers.{i}.{k}" for i in range(listed) for k in LAYER_KEYS.values()}
    if not cfg.tie_embeddings:
        expected.add("lm_head.weight")
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - optional)
    if missing or unexpected:
        parts = []
        if missing:
            alt = " (or backbone.embeddings.weight)" if emb_name in missing else ""
            if listed < cfg.n_layer:
                alt += f", and every tensor of layers {listed} to {cfg.n_layer - 1}"
            parts.append(f"missing tensors: {name_list(missing)}{alt}")
        if unexpected:
            parts.append(f"unexpected tensors: {name_list(unexpected)}")
        raise CheckpointError(
            f"{path}: checkpoint does not match its config (n_layer={cfg.n_layer}, "
            f"tie_embeddings={cfg.tie_embeddings}): {'; '.join(parts)}"
        )

    def check_shape(name: str, want: tuple[int, ...]) -> None:
        got = tuple(src.shape(name))
        if got != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {got}, expected {want} for this config")

    def checked(name: str, want: tuple[int, ...]) -> np.ndarray:
        check_shape(name, want)
        return src.read(name)

    # Check every shape before reading anything.
    shapes = checkpoint_shapes(cfg)
    for field, shape in shapes.items():
        for i in range(cfg.n_layer):
            check_shape(f"backbone.layers.{i}.{LAYER_KEYS[field]}", _checkpoint_shape(field, shape))
    check_shape("backbone.norm_f.weight", (cfg.d_model,))
    vocab_names = [emb_name] + (["lm_head.weight"] if "lm_head.weight" in names else [])
    for name in vocab_names:
        shape = tuple(src.shape(name))
        if shape not in ((cfg.vocab_size, cfg.d_model), (cfg.padded_vocab_size, cfg.d_model)):
            want = f"({cfg.padded_vocab_size}, {cfg.d_model})"
            if cfg.vocab_size != cfg.padded_vocab_size:
                want += f" or unpadded ({cfg.vocab_size}, {cfg.d_model})"
            raise CheckpointError(f"{path}: tensor {name} has shape {shape}, expected {want} for this config")

    for name in sorted(names):  # every tensor, not just the one whose dtype the matrices keep
        got = src.dtype(name)
        if not np.issubdtype(got, np.floating) and got != np.dtype(ml_dtypes.bfloat16):
            raise CheckpointError(f"{path}: tensor {name} has non-floating dtype {got}")
    in_proj_dtype = src.dtype("backbone.layers.0.mixer.in_proj.weight")
    mat_dtype = np.dtype(in_proj_dtype if dtype is None else dtype)

    def vocab_matrix(name: str):
        arr = src.read(name)
        if arr.shape[0] == cfg.padded_vocab_size:
            return jnp.asarray(arr.astype(mat_dtype, copy=False))
        out = np.zeros((cfg.padded_vocab_size, cfg.d_model), mat_dtype)
        out[: arr.shape[0]] = arr
        del arr
        return jnp.asarray(out)

    def layer_tensors(field: str, i: int) -> dict[str, np.ndarray]:
        """Layer i's published tensor ``field``, as the fields of ours it holds."""
        want = _checkpoint_shape(field, shapes[field])
        arr = _to_ours(field, checked(f"backbone.layers.{i}.{LAYER_KEYS[field]}", want))
        arr = arr.astype(np.float32 if field in FLOAT32_LAYER_FIELDS else mat_dtype, copy=False)
        return split_published(cfg, field, arr)

    if stacked:
        fields = {}
        for field in CHECKPOINT_FIELDS:  # one published field at a time, filled layer by layer
            bufs: dict[str, np.ndarray] = {}
            for i in range(cfg.n_layer):
                for name, part in layer_tensors(field, i).items():
                    if name not in bufs:
                        bufs[name] = np.empty((cfg.n_layer, *part.shape), part.dtype)
                    bufs[name][i] = part
            fields.update({name: jnp.asarray(buf) for name, buf in bufs.items()})
            del bufs
        layers = Mamba2LayerParams(**fields)
    else:
        layers = tuple(
            Mamba2LayerParams(**{name: jnp.asarray(part) for field in CHECKPOINT_FIELDS
                                 for name, part in layer_tensors(field, i).items()})
            for i in range(cfg.n_layer)
        )
    params = Mamba2Params(
        embedding=vocab_matrix(emb_name),
        layers=layers,
        norm_f=jnp.asarray(src.read("backbone.norm_f.weight").astype(mat_dtype, copy=False)),
        lm_head=None if cfg.tie_embeddings else vocab_matrix("lm_head.weight"),
    )
    return params, cfg


# ------------------------------------------------------------------------------ save
def save_checkpoint(params: Mamba2Params, cfg: Mamba2Config, path: str | Path) -> None:
    """Write ``config.json`` (transformers format) and ``model.safetensors`` (transformers names, metadata
    ``{"format": "pt"}``) into directory ``path``, which :func:`load_checkpoint` and
    ``transformers.Mamba2ForCausalLM.from_pretrained`` both read.

    ``lm_head.weight`` is written only for untied configs. Tensors keep their dtypes. Stacked or
    per-layer params are accepted.
    """
    per_layer = params.layers
    if not is_per_layer(per_layer):  # stacked: one host copy of each field, per-layer numpy views of it
        host = {f.name: np.asarray(getattr(per_layer, f.name)) for f in dataclasses.fields(per_layer)}
        n = len(next(iter(host.values())))
        per_layer = tuple(Mamba2LayerParams(**{k: v[i] for k, v in host.items()}) for i in range(n))
    if len(per_layer) != cfg.n_layer:
        raise ValueError(f"params hold {len(per_layer)} layers, expected n_layer={cfg.n_layer}")
    shapes = {f"layers.{k}": v[1:] for k, v in layer_shapes(cfg).items()}
    shapes["embedding"] = (cfg.padded_vocab_size, cfg.d_model)
    shapes["norm_f"] = (cfg.d_model,)
    if cfg.tie_embeddings and params.lm_head is not None:
        raise ValueError("the config ties the embeddings but params.lm_head is set: save with an untied config "
                         "(dataclasses.replace(cfg, tie_embeddings=False)) or drop lm_head")
    if not cfg.tie_embeddings:
        if params.lm_head is None:
            raise ValueError("the config has untied embeddings but params.lm_head is None")
        shapes["lm_head"] = shapes["embedding"]
    for name, shape in shapes.items():
        _, _, field = name.partition(".")
        objs = [(f"layers[{i}].{field}", getattr(lp, field)) for i, lp in enumerate(per_layer)] if field \
            else [(name, getattr(params, name))]
        for label, obj in objs:
            if tuple(obj.shape) != shape:
                raise ValueError(f"params.{label} has shape {tuple(obj.shape)}, expected {shape} for this config")

    tensors: dict[str, np.ndarray] = {"backbone.embeddings.weight": np.asarray(params.embedding)}
    for i, lp in enumerate(per_layer):
        host = Mamba2LayerParams(**{f.name: np.asarray(getattr(lp, f.name)) for f in dataclasses.fields(lp)})
        for field in CHECKPOINT_FIELDS:
            tensors[f"backbone.layers.{i}.{LAYER_KEYS[field]}"] = _to_torch(field, join_published(cfg, field, host))
    tensors["backbone.norm_f.weight"] = np.asarray(params.norm_f)
    if not cfg.tie_embeddings:
        tensors["lm_head.weight"] = np.asarray(params.lm_head)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(cfg.to_transformers_json())

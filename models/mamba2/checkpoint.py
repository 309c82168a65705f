"""Mamba-2 checkpoints: mamba_ssm's ``pytorch_model.bin`` and transformers' ``model.safetensors``.

Loading reads one tensor at a time into preallocated stacked arrays (no second full copy of the
weights) and checks every name and shape against the config. ``.bin`` files are read WITHOUT torch:
the zip archive's pickle is replayed by a restricted unpickler that only rebuilds tensors and refuses
every other global, so a malicious checkpoint raises :class:`CheckpointError` and runs nothing.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.mamba2.config import Mamba2Config
from models.mamba2.params import (
    FLOAT32_LAYER_FIELDS,
    Mamba2LayerParams,
    Mamba2Params,
    layer_shapes,
    stack_layers,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe, or not matching its config."""


# ------------------------------------------------------------------------------ names
#: checkpoint suffix under ``backbone.layers.{i}.`` for each stacked field
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


def _checkpoint_shape(field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Checkpoint (torch) shape of one layer's tensor from our per-layer shape."""
    if field == "conv_weight":  # ours (K, conv_dim) <-> torch (conv_dim, 1, K)
        return (shape[1], 1, shape[0])
    return shape


def _to_ours(field: str, arr: np.ndarray) -> np.ndarray:
    return arr[:, 0, :].T if field == "conv_weight" else arr


def _to_torch(field: str, arr: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr.T[:, None, :]) if field == "conv_weight" else arr


# ------------------------------------------------------------------------------ tensor sources
class _Source(Protocol):
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str) -> np.ndarray: ...


class _SafetensorsSource:
    """One or several (``model.safetensors.index.json``) safetensors files, read tensor by tensor."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, object] = {}
        self._handles = []
        for f in files:
            try:
                handle = safe_open(str(f), framework="np")
            except Exception as err:  # noqa: BLE001 - the library raises its own error types
                raise CheckpointError(f"{f} is not a readable safetensors file: {err}") from None
            self._handles.append(handle)
            for k in handle.keys():
                self._where[k] = (handle, f)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, _ = self._where[name]
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        return self.read(name).dtype

    def read(self, name: str) -> np.ndarray:
        handle, f = self._where[name]
        try:
            return handle.get_tensor(name)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot read tensor {name}: {err}") from None


_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


@dataclasses.dataclass(frozen=True)
class _LazyStorage:
    member: str
    dtype: np.dtype
    numel: int


@dataclasses.dataclass(frozen=True)
class _LazyTensor:
    storage: _LazyStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    if not isinstance(storage, _LazyStorage):
        raise pickle.UnpicklingError("tensor without a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise pickle.UnpicklingError(f"invalid tensor geometry size={size} stride={stride}")
    if all(size):
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor reaches element {last} of a storage of {storage.numel} elements"
            )
    return _LazyTensor(storage, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_rest):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds a state dict of tensors and nothing else."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: not part of a tensor state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        member = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
        if info.file_size < int(numel) * storage_type.dtype.itemsize:
            raise pickle.UnpicklingError(f"storage {key} holds {info.file_size} bytes, fewer than {numel} elements")
        return _LazyStorage(member, storage_type.dtype, int(numel))


class _TorchZipSource:
    """A ``torch.save`` zip archive of a state dict, read without torch."""

    def __init__(self, path: Path):
        self._path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise CheckpointError(
                f"{path} is not a zip archive: legacy (pre-1.6) or corrupt torch files are not supported; "
                f"re-save it with a current torch (torch.save(state_dict, path)) or convert it to safetensors"
            ) from None
        except OSError as err:
            raise CheckpointError(f"cannot open {path}: {err}") from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0].rpartition("/")[0]
        self._big_endian = False
        if f"{prefix}/byteorder" in self._zip.namelist():
            self._big_endian = self._zip.read(f"{prefix}/byteorder").strip() == b"big"
        try:
            with self._zip.open(pkl[0]) as f:
                obj = _RestrictedUnpickler(f, self._zip, prefix).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                zipfile.BadZipFile, OSError) as err:
            raise CheckpointError(f"{path}: not a loadable tensor state dict: {err}") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, _LazyTensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state dict)")
        self._tensors: dict[str, _LazyTensor] = dict(obj)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self._tensors[name].storage.dtype

    def read(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        try:
            raw = self._zip.read(t.storage.member)
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise CheckpointError(f"{self._path}: cannot read tensor {name}: {err}") from None
        dtype = t.storage.dtype.newbyteorder(">") if self._big_endian else t.storage.dtype
        flat = np.frombuffer(raw, dtype=dtype, count=t.storage.numel)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape, strides=tuple(s * item for s in t.stride), writeable=False
        )
        return np.ascontiguousarray(view).astype(t.storage.dtype, copy=False)


def _open(path: Path) -> _Source:
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    if st.exists():
        return _SafetensorsSource([st])
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard files: {missing}")
        return _SafetensorsSource(files)
    if binf.exists():
        return _TorchZipSource(binf)
    raise CheckpointError(
        f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


# ------------------------------------------------------------------------------ load
def load_checkpoint(path: str | Path, *, dtype=None) -> tuple[Mamba2Params, Mamba2Config]:
    """Load ``config.json`` and the weights of a Mamba-2 checkpoint directory.

    Accepts mamba_ssm naming (``backbone.embedding.weight``) and transformers naming
    (``backbone.embeddings.weight``); ``lm_head.weight`` may be present or absent when tied (it is
    then not read). The embedding is zero-padded to the padded vocabulary if stored unpadded.

    ``dtype=None`` keeps the checkpoint's dtype of ``in_proj`` for all matrices and norms; a dtype
    casts them. ``dt_bias``, ``A_log`` and ``D`` are always float32.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    try:
        cfg = Mamba2Config.from_json(path / "config.json")
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no config.json") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path / 'config.json'}: {err}") from None
    src = _open(path)
    names = src.names()

    emb_name = next((n for n in ("backbone.embedding.weight", "backbone.embeddings.weight") if n in names),
                    "backbone.embedding.weight")
    expected = {emb_name, "backbone.norm_f.weight"}
    expected |= {f"backbone.layers.{i}.{k}" for i in range(cfg.n_layer) for k in LAYER_KEYS.values()}
    if not cfg.tie_embeddings:
        expected.add("lm_head.weight")
    optional = {"lm_head.weight"} if cfg.tie_embeddings else set()
    missing = sorted(expected - names)
    unexpected = sorted(names - expected - optional)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected[:10])}"
                         + (" ..." if len(unexpected) > 10 else ""))
        raise CheckpointError(f"{path}: checkpoint does not match its config ({'; '.join(parts)})")

    mat_dtype = np.dtype(src.dtype("backbone.layers.0.mixer.in_proj.weight") if dtype is None
                         else jnp.dtype(dtype))

    def checked(name: str, want: tuple[int, ...]) -> np.ndarray:
        got = tuple(src.shape(name))
        if got != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {got}, expected {want} for this config")
        return src.read(name)

    def vocab_matrix(name: str) -> jnp.ndarray:
        rows = src.shape(name)[0] if len(src.shape(name)) == 2 else -1
        want_rows = rows if rows in (cfg.vocab_size, cfg.padded_vocab_size) else cfg.padded_vocab_size
        arr = checked(name, (want_rows, cfg.d_model))
        out = np.zeros((cfg.padded_vocab_size, cfg.d_model), mat_dtype)
        out[:rows] = arr
        return jnp.asarray(out)

    fields = {}
    for field, shape in layer_shapes(cfg).items():
        field_dtype = np.float32 if field in FLOAT32_LAYER_FIELDS else mat_dtype
        stacked = np.empty(shape, field_dtype)
        want = _checkpoint_shape(field, shape[1:])
        for i in range(cfg.n_layer):
            name = f"backbone.layers.{i}.{LAYER_KEYS[field]}"
            stacked[i] = _to_ours(field, checked(name, want))
        fields[field] = jnp.asarray(stacked)
        del stacked
    params = Mamba2Params(
        embedding=vocab_matrix(emb_name),
        layers=Mamba2LayerParams(**fields),
        norm_f=jnp.asarray(checked("backbone.norm_f.weight", (cfg.d_model,)).astype(mat_dtype)),
        lm_head=None if cfg.tie_embeddings else vocab_matrix("lm_head.weight"),
    )
    return params, cfg


# ------------------------------------------------------------------------------ save
def save_checkpoint(params: Mamba2Params, cfg: Mamba2Config, path: str | Path) -> None:
    """Write ``config.json`` (transformers format) and ``model.safetensors`` (transformers names), which
    ``transformers.Mamba2ForCausalLM.from_pretrained`` and :func:`load_checkpoint` both read."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = stack_layers(params)
    shapes = layer_shapes(cfg)
    for field, shape in shapes.items():
        got = tuple(getattr(params.layers, field).shape)
        if got != shape:
            raise ValueError(f"params.layers.{field} has shape {got}, expected {shape} for this config")
    tensors: dict[str, np.ndarray] = {"backbone.embeddings.weight": np.asarray(params.embedding),
                                      "backbone.norm_f.weight": np.asarray(params.norm_f)}
    for field in shapes:
        stacked = np.asarray(getattr(params.layers, field))
        for i in range(cfg.n_layer):
            tensors[f"backbone.layers.{i}.{LAYER_KEYS[field]}"] = _to_torch(field, stacked[i])
    if not cfg.tie_embeddings:
        if params.lm_head is None:
            raise ValueError("the config has untied embeddings but params.lm_head is None")
        tensors["lm_head.weight"] = np.asarray(params.lm_head)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    (path / "config.json").write_text(cfg.to_transformers_json())
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

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

(``models.mamba2.params.split_published`` / ``join_published`` do the regrouping: a pure re-arrangement.)
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import pickletools
import reprlib
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Protocol

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from models.mamba2.config import Mamba2Config, parse_json_file
from models.mamba2.params import (
    CHECKPOINT_FIELDS,
    FLOAT32_LAYER_FIELDS,
    Mamba2LayerParams,
    Mamba2Params,
    checkpoint_shapes,
    join_published,
    layer_shapes,
    split_published,
)
from ssdkit.stack import is_per_layer

__all__ = ["CheckpointError", "LAYER_KEYS", "load_checkpoint", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe, or not matching its config."""


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


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# ------------------------------------------------------------------------------ tensor sources
class _Source(Protocol):
    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str) -> np.ndarray: ...
    def close(self) -> None: ...


_SAFETENSORS_DTYPES = {
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
}


class _SafetensorsSource:
    """One or several (``model.safetensors.index.json``) safetensors files, read tensor by tensor."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._where: dict[str, tuple[object, Path]] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="np")
                keys = list(handle.keys())
            except Exception as err:  # the library raises its own (and generic) error types
                raise CheckpointError(f"{f} is not a readable safetensors file (truncated or corrupt?): "
                                      f"{err}") from None
            for k in keys:
                if k in self._where:
                    raise CheckpointError(f"tensor {k} is stored in both {self._where[k][1]} and {f}")
                self._where[k] = (handle, f)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, _ = self._where[name]
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> np.dtype:
        handle, f = self._where[name]
        code = handle.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {code}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def read(self, name: str) -> np.ndarray:
        handle, f = self._where[name]
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"{f}: cannot read tensor {name}: {err}") from None

    def close(self) -> None:
        self._where.clear()  # safe_open handles unmap when dropped


# -- torch zip archives, without torch ------------------------------------------------------------
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
#: how ``torch.save`` without the zip format (torch < 1.6, or _use_new_zipfile_serialization=False) begins
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."
#: the most a deflate stream expands (1032:1)
_MAX_DEFLATE_RATIO = 1032


def _implausible_sizes(info: zipfile.ZipInfo, archive_size: int) -> str | None:
    """Why the sizes a zip member declares cannot be true in an archive of ``archive_size`` bytes, or None.

    zipfile trusts the headers and reads (allocating) up to the declared size before it finds the data
    missing: without this check a few-KB archive could make the loader allocate gigabytes."""
    if info.header_offset + info.compress_size > archive_size:
        return f"declares {info.compress_size} bytes of data, more than the {archive_size}-byte archive holds"
    if info.compress_type == zipfile.ZIP_STORED:
        ok = info.file_size == info.compress_size
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        ok = info.file_size <= _MAX_DEFLATE_RATIO * info.compress_size + 1024
    else:
        return f"uses zip compression method {info.compress_type} (torch stores members uncompressed)"
    return None if ok else (f"declares {info.file_size} bytes uncompressed from {info.compress_size} bytes "
                            f"stored, which its compression method cannot give")


# What the unpickler hands to the pickle are NamedTuples: immutable even to the BUILD opcode, which
# rewrites a dataclass through its __setstate__ or __dict__ (frozen or not) and so could move a tensor
# outside its storage after _rebuild_tensor checked its geometry.
class _StorageType(NamedTuple):
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name])


class _LazyStorage(NamedTuple):
    member: str
    dtype: np.dtype
    numel: int


class _LazyTensor(NamedTuple):
    storage: _LazyStorage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _as_index(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise pickle.UnpicklingError(f"invalid tensor {what} {reprlib.repr(v)}")
    return v


def _rebuild_tensor(storage, storage_offset, size, stride, *_rest):
    """Stands in for ``torch._utils._rebuild_tensor_v2``: records the tensor's geometry, checked to
    stay inside its storage (so no offset/stride can reach outside the buffer when read)."""
    if not isinstance(storage, _LazyStorage):
        raise pickle.UnpicklingError("tensor without a storage")
    if not isinstance(size, tuple | list) or not isinstance(stride, tuple | list) or len(size) != len(stride):
        raise pickle.UnpicklingError(f"invalid tensor geometry size={reprlib.repr(size)} "
                                     f"stride={reprlib.repr(stride)}")
    offset = _as_index(storage_offset, "storage offset")
    size = tuple(_as_index(s, "size") for s in size)
    stride = tuple(_as_index(s, "stride") for s in stride)
    if offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"invalid tensor geometry offset={offset} size={size} stride={stride}")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.numel:
            raise pickle.UnpicklingError(
                f"tensor (offset {offset}, size {size}, stride {stride}) reaches element {last} of a storage "
                f"of {storage.numel} elements"
            )
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_rest):
    """Stands in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter`` in the state dict)."""
    if not isinstance(data, _LazyTensor):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _torch_size(dims=()):
    return tuple(_as_index(d, "size") for d in dims)


class _Callable(NamedTuple):
    """An allowed function as a pickle sees it: callable, with no attribute a BUILD opcode could rewrite
    (a plain function's ``__dict__`` and ``__defaults__`` would stay rewritten for the whole process)."""

    fn: object

    def __call__(self, *args):
        return self.fn(*args)


def _check_opcodes(data: bytes) -> None:
    """Parse a pickle's opcodes, running nothing, before unpickling it: the C unpickler allocates what an
    opcode declares before reading anything (``LONG_BINPUT 2**31`` grows the memo to 32 GB, ``BINBYTES8``
    allocates its declared length), so a few bytes could claim gigabytes. ``genops`` checks every declared
    length against the data; memo indices are bounded here by the pickle's size."""
    for op, arg, pos in pickletools.genops(data):
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= len(data):
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} is out of range for a pickle of "
                                         f"{len(data)} bytes")


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds a state dict of tensors and nothing else: every other global is refused."""

    _ALLOWED = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
        ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
        ("torch", "Size"): _Callable(_torch_size),
    }

    def __init__(self, file, archive: zipfile.ZipFile, archive_size: int, prefix: str):
        super().__init__(file)
        self._archive = archive
        self._archive_size = archive_size
        self._prefix = prefix

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: not part of a tensor state dict"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {reprlib.repr(pid)}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {reprlib.repr(storage_type)}")
        if not isinstance(key, str) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"invalid storage reference {reprlib.repr(pid)}")
        member = f"{self._prefix}/data/{key}"
        try:
            info = self._archive.getinfo(member)
        except KeyError:
            raise pickle.UnpicklingError(f"storage {key} is missing from the archive") from None
        if (why := _implausible_sizes(info, self._archive_size)) is not None:
            raise pickle.UnpicklingError(f"storage {key} {why}")
        if info.file_size < numel * storage_type.dtype.itemsize:
            raise pickle.UnpicklingError(
                f"storage {key} holds {info.file_size} bytes, fewer than its {numel} elements need"
            )
        return _LazyStorage(member, storage_type.dtype, numel)


class _TorchZipSource:
    """A ``torch.save`` zip archive of a state dict, read without torch."""

    def __init__(self, path: Path):
        self._path = path
        try:
            with open(path, "rb") as f:
                head = f.read(len(_LEGACY_TORCH_MAGIC))
            self._zip = zipfile.ZipFile(path)
            size = path.stat().st_size
        except zipfile.BadZipFile:
            if head.startswith(_LEGACY_TORCH_MAGIC):
                why = ("it was written by torch's legacy (pre-1.6, non-zip) serialization, which is not "
                       "supported; re-save it with a current torch (torch.save(torch.load(f), f)) or "
                       "convert it to safetensors")
            elif head.startswith(b"PK"):
                why = "the zip archive is truncated or corrupt"
            else:
                why = ("it is neither a torch zip checkpoint nor a legacy torch file (corrupt?); a legacy "
                       "checkpoint must be re-saved with a current torch")
            raise CheckpointError(f"{path} is not a zip archive: {why}") from None
        except OSError as err:
            raise CheckpointError(f"cannot open {path}: {err}") from None
        except Exception as err:  # zipfile also raises NotImplementedError, ValueError, ... on corrupt headers
            raise CheckpointError(f"{path} is not a readable zip archive (truncated or corrupt?): "
                                  f"{type(err).__name__}: {err}") from None
        pkl = [n for n in self._zip.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            self._zip.close()
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0].rpartition("/")[0]
        for name in (pkl[0], f"{prefix}/byteorder"):
            if name in self._zip.namelist() and (why := _implausible_sizes(self._zip.getinfo(name), size)):
                self._zip.close()
                raise CheckpointError(f"{path}: the archive is corrupt: {name} {why}")
        self._big_endian = False
        if f"{prefix}/byteorder" in self._zip.namelist():
            try:
                order = self._zip.read(f"{prefix}/byteorder").strip()
            except Exception as err:  # zipfile.BadZipFile (CRC), OSError, EOFError, zlib.error, ...
                self._zip.close()
                raise CheckpointError(f"{path}: cannot read its byteorder record: {err}") from None
            if order not in (b"little", b"big"):
                self._zip.close()
                raise CheckpointError(f"{path}: byteorder record is {reprlib.repr(order)}, not little or big")
            self._big_endian = order == b"big"
        try:
            data = self._zip.read(pkl[0])
            _check_opcodes(data)
            obj = _RestrictedUnpickler(io.BytesIO(data), self._zip, size, prefix).load()
        except Exception as err:  # malformed pickles raise anything; none of it ran foreign code
            self._zip.close()
            raise CheckpointError(f"{path}: not a loadable tensor state dict: {err}") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, _LazyTensor)
                                                for k, v in obj.items()):
            self._zip.close()
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
        except Exception as err:  # zipfile.BadZipFile (CRC), OSError, EOFError, zlib.error, ...
            raise CheckpointError(f"{self._path}: cannot read tensor {name}: {err}") from None
        dtype = t.storage.dtype.newbyteorder(">" if self._big_endian else "<")
        if len(raw) < t.storage.numel * dtype.itemsize:
            raise CheckpointError(f"{self._path}: storage of tensor {name} is truncated")
        flat = np.frombuffer(raw, dtype=dtype, count=t.storage.numel)
        # _rebuild_tensor checked that offset + Σ(size-1)·stride < numel: the view stays inside `flat`.
        view = np.lib.stride_tricks.as_strided(
            flat[t.offset:], shape=t.shape, strides=tuple(s * dtype.itemsize for s in t.stride), writeable=False
        )
        return np.ascontiguousarray(view).astype(t.storage.dtype, copy=False)

    def close(self) -> None:
        self._zip.close()


def _open(path: Path) -> _Source:
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    if st.exists():
        return _SafetensorsSource([st])
    if index.exists():
        try:
            data = parse_json_file(index)  # ValueError for bad syntax / UTF-8, huge integers, deep nesting
        except (ValueError, OSError) as err:
            raise CheckpointError(str(err)) from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f'{index}: not a safetensors index (expected {{"weight_map": {{tensor name: '
                                  f'shard file name}}}})')
        shards = sorted(set(weight_map.values()))
        outside = [f for f in shards if f in ("", "..") or Path(f).name != f]  # absolute, nested, "."
        if outside:
            raise CheckpointError(f"{index} names shard files outside the checkpoint directory: "
                                  f"{_name_list([repr(f) for f in outside])}")
        files = [path / f for f in shards]
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
      ``stacked=True`` gives them stacked on a leading layer axis instead (``models.mamba2.params``),
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
    src = _open(path)
    try:
        return _load(src, path, cfg, dtype, stacked)
    finally:
        src.close()


def _load(src: _Source, path: Path, cfg: Mamba2Config, dtype, stacked: bool) -> tuple[Mamba2Params, Mamba2Config]:
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
            parts.append(f"missing tensors: {_name_list(missing)}{alt}")
        if unexpected:
            parts.append(f"unexpected tensors: {_name_list(unexpected)}")
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
    from safetensors.numpy import save_file

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
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(cfg.to_transformers_json())

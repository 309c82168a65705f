"""Tensor files, read and written safely: safetensors (single or sharded with an index) and ``torch.save``
zip archives (``pytorch_model.bin``), with no knowledge of any model.

A model's checkpoint loader asks :func:`open_tensor_dir` for a directory's tensors and reads them one at
a time through the :class:`TensorSource` it returns (names, then each tensor's shape and dtype without
reading it, then its data as a numpy array); mapping names onto its parameters and checking them against
its config is the model's part. :func:`save_safetensors` writes a dict of arrays.

Untrusted input: ``.bin`` archives are read WITHOUT torch. Their pickle is parsed first (opcodes only,
nothing run) and then replayed by a restricted unpickler that only rebuilds tensors (their geometry
checked to stay inside their storage) and refuses every other global; the sizes zip headers declare
are checked against the archive before anything is allocated. A malicious, corrupt or truncated file
raises :class:`CheckpointError`, naming the file (and the tensor, where one is at fault), and runs
nothing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import reprlib
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "SafetensorsReader",
    "TensorSource",
    "TorchZipReader",
    "name_list",
    "open_tensor_dir",
    "save_safetensors",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupt, unsafe, or not matching its config."""


def name_list(names: list[str], limit: int = 12) -> str:
    """``names`` joined by commas for a message, the first ``limit`` of them and the count past that."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def parse_json_file(path: Path):
    """``json.load`` of an untrusted file (config.json, an index), every parse failure a ``ValueError``
    naming the file; OSError (FileNotFoundError, ...) from reading it passes through."""
    text = Path(path).read_bytes()
    try:
        return json.loads(text)  # bytes: UTF-8/16/32 detected as JSON allows, whatever the locale
    except (ValueError, RecursionError) as err:
        # ValueError: bad syntax, bad UTF-8, an integer over Python's digit limit;
        # RecursionError: nesting deeper than the parser's recursion allows (e.g. 100k nested lists)
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ValueError(f"{path} is not valid JSON: {why}") from None


# ------------------------------------------------------------------------------ tensor sources
class TensorSource(Protocol):
    """Named tensors of one checkpoint, read one at a time: ``names()``; ``shape(name)`` and ``dtype(name)``
    without reading the data; ``read(name)`` as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``);
    ``close()`` when done. Every failure is a :class:`CheckpointError` naming the file and the tensor."""

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str) -> np.ndarray: ...
    def close(self) -> None: ...


_SAFETENSORS_DTYPES = {
    "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F32": np.float32, "F64": np.float64,
    "I8": np.int8, "U8": np.uint8, "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_,
}


class SafetensorsReader:
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


class TorchZipReader:
    """A ``torch.save`` zip archive of a state dict (or of ``{"state_dict": ...}``), read without torch:
    the pickle only rebuilds tensors, and each tensor's bytes are read from the archive when asked for."""

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


def open_tensor_dir(path: Path) -> TensorSource:
    """The tensors of checkpoint directory ``path``, from the first of ``model.safetensors``, a sharded
    ``model.safetensors.index.json`` (its shards inside ``path``) or ``pytorch_model.bin`` (a
    ``torch.save`` zip archive, read without torch) that it holds; :class:`CheckpointError` if none is
    there or the one found cannot be opened."""
    st = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binf = path / "pytorch_model.bin"
    if st.exists():
        return SafetensorsReader([st])
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
                                  f"{name_list([repr(f) for f in outside])}")
        files = [path / f for f in shards]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names missing shard files: {missing}")
        return SafetensorsReader(files)
    if binf.exists():
        return TorchZipReader(binf)
    raise CheckpointError(
        f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


# ------------------------------------------------------------------------------ writing
def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | Path, *,
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array, any layout: each is made contiguous) to the safetensors file
    ``path``, with the header ``metadata`` (transformers reads ``{"format": "pt"}`` as torch's layout)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    # safetensors writes through a private (0600) temporary file: give the file the mode its siblings get
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask (read from /proc where there is one: setting it, even back, is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

"""Fuzzing the untrusted-input surfaces: ``load_checkpoint`` (safetensors, sharded index JSON, torch zip
archives and their pickles), ``Mamba2Config.from_json`` and ``load_tokenizer``.

Each test builds a small valid file in the real format (torch archives are written with the stdlib, opcode
by opcode as ``torch.save`` writes them, so no torch is needed), corrupts it (truncation, byte flips,
rewritten header fields, absurd sizes, deep nesting, non-UTF-8 bytes, huge integers, hostile pickle
opcodes) and checks that loading

* ends in the module's own error: :class:`CheckpointError` for checkpoints, ``ValueError`` naming the
  file for configs and tokenizers; never another exception type;
* or succeeds with a valid result (a flipped byte inside tensor data is a legitimate file): every shape
  and dtype as the config says;
* never hangs (each load is timed), never runs a global named by a pickle, and never allocates more
  than the file justifies (peak traced allocation bounded, no ``MemoryError`` swallowed on the way).

Default mode: a few hundred examples in all. ``pytest -m long`` runs every fuzzer with ``LONG_FACTOR``
times more examples.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import struct
import tempfile
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssdkit.models import mamba2
from ssdkit.models.mamba2 import CheckpointError, Mamba2Config
from ssdkit.models.mamba2.checkpoint import LAYER_KEYS
from ssdkit.models.mamba2.params import FLOAT32_LAYER_FIELDS, checkpoint_shapes, layer_shapes
from ssdkit.models.mamba2.tokenizer import _PROBE_TEXT
from tests.test_mamba2_checkpoint import assert_params_match

#: the smallest config with every feature (two heads, grouped B/C): checkpoints of a few KB
CFG = Mamba2Config(d_model=8, n_layer=2, vocab_size=12, d_state=2, headdim=8, chunk_size=4, d_conv=2,
                   pad_vocab_size_multiple=8)
LONG_FACTOR = 10
#: wall-clock bound of one load (generous: these files are a few KB and load in milliseconds)
TIME_LIMIT_S = 10.0
#: bound on the peak traced allocation of one load (the files are a few KB; JAX/numpy overheads aside)
ALLOC_LIMIT = 64 << 20
ABSURD = [2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]


def fuzz(n: int, **strategies):
    """``@given(**strategies)`` with ``n`` examples, plus a copy marked ``long`` with ``LONG_FACTOR·n``."""

    def deco(test):
        @pytest.mark.parametrize("n_examples", [pytest.param(n, id="default"),
                                                pytest.param(n * LONG_FACTOR, id="long", marks=pytest.mark.long)])
        def run(n_examples):
            settings(max_examples=n_examples, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.filter_too_much])(given(**strategies)(test))()

        run.__name__ = run.__qualname__ = test.__name__
        run.__doc__ = test.__doc__
        return run

    return deco


# ------------------------------------------------------------------------------ valid files
def _state_dict(cfg: Mamba2Config = CFG) -> dict[str, np.ndarray]:
    """mamba_ssm names, float16 matrices and float32 dt_bias/A_log/D, as the published checkpoints."""
    rng = np.random.default_rng(0)

    def rand(shape, dtype=np.float16):
        return rng.standard_normal(shape).astype(dtype)

    sd = {"backbone.embedding.weight": rand((cfg.padded_vocab_size, cfg.d_model))}
    for i in range(cfg.n_layer):
        for field, shape in checkpoint_shapes(cfg).items():  # torch's conv1d is (conv_dim, 1, K)
            shape = (shape[1], 1, shape[0]) if field == "conv_weight" else shape
            sd[f"backbone.layers.{i}.{LAYER_KEYS[field]}"] = rand(
                shape, np.float32 if field in FLOAT32_LAYER_FIELDS else np.float16)
    sd["backbone.norm_f.weight"] = rand((cfg.d_model,))
    return sd


SD = _state_dict()
CONFIG_JSON = json.dumps(CFG.to_mamba_ssm_dict()).encode()


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": "pt"})


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


ST_BYTES = _safetensors_bytes(SD)
_SHARD_NAMES = sorted(SD)
SHARDS = {"model-00001-of-00002.safetensors": _safetensors_bytes({k: SD[k] for k in _SHARD_NAMES[::2]}),
          "model-00002-of-00002.safetensors": _safetensors_bytes({k: SD[k] for k in _SHARD_NAMES[1::2]})}
INDEX = {"metadata": {"total_size": sum(v.nbytes for v in SD.values())},
         "weight_map": {k: f"model-0000{1 + n % 2}-of-00002.safetensors" for n, k in enumerate(_SHARD_NAMES)}}

# -- torch zip archives, written opcode by opcode as torch.save writes them (protocol 2) ---------------
_STORAGE = {np.dtype(np.float16): "HalfStorage", np.dtype(np.float32): "FloatStorage"}


def _p_str(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(i: int) -> bytes:
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if -(2**31) <= i < 2**31:
        return b"J" + struct.pack("<i", i)
    enc = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)  # LONG1 / LONG4
    return (b"\x8a" + bytes([len(enc)]) if len(enc) < 256 else b"\x8b" + struct.pack("<I", len(enc))) + enc


def _p_tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _p_tensor(storage_type: str, key: str, numel: int, offset: int, size, stride) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    storage = _p_tuple([_p_str("storage"), _p_global("torch", storage_type), _p_str(key), _p_str("cpu"),
                        _p_int(numel)]) + b"Q"  # BINPERSID
    return (_p_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _p_int(offset)
            + _p_tuple(map(_p_int, size)) + _p_tuple(map(_p_int, stride)) + b"\x89"
            + _p_global("collections", "OrderedDict") + b")R" + b"tR")


def _p_state_dict(entries: list[tuple[str, bytes]]) -> bytes:
    """``OrderedDict(entries)``: SETITEMS over (name, pickled tensor) pairs."""
    return (b"\x80\x02" + _p_global("collections", "OrderedDict") + b")R("
            + b"".join(_p_str(k) + v for k, v in entries) + b"u.")


def _contiguous_strides(shape) -> tuple[int, ...]:
    return tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape)))


def _torch_parts(sd: dict[str, np.ndarray]) -> tuple[bytes, dict[str, bytes]]:
    entries, storages = [], {}
    for n, (k, v) in enumerate(sd.items()):
        entries.append((k, _p_tensor(_STORAGE[v.dtype], str(n), v.size, 0, v.shape, _contiguous_strides(v.shape))))
        storages[str(n)] = np.ascontiguousarray(v).astype(v.dtype.newbyteorder("<")).tobytes()
    return _p_state_dict(entries), storages


def _zip_bytes(pkl: bytes, storages: dict[str, bytes], byteorder: bytes = b"little") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", byteorder)
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", b"3\n")
    return buf.getvalue()


PKL, STORAGES = _torch_parts(SD)
BIN_BYTES = _zip_bytes(PKL, STORAGES)


# ------------------------------------------------------------------------------ checking one load
@contextlib.contextmanager
def _checkpoint_dir(files: dict[str, bytes]):
    with tempfile.TemporaryDirectory() as d:
        for name, raw in files.items():
            (Path(d) / name).write_bytes(raw)
        yield Path(d)


def _bounded(fn, *, alloc_limit: int | None = None):
    """Run ``fn()``: it must finish within TIME_LIMIT_S, and (when ``alloc_limit``) not allocate more."""
    if alloc_limit is not None:
        tracemalloc.start()
    t0 = time.monotonic()
    try:
        return fn()
    finally:
        elapsed = time.monotonic() - t0
        if alloc_limit is not None:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < alloc_limit, f"load allocated {peak} bytes (limit {alloc_limit})"
        assert elapsed < TIME_LIMIT_S, f"load took {elapsed:.1f} s"


def _assert_not_memory_error(err: BaseException) -> None:
    """A huge allocation attempted and failed is a bug too, even when it ends in the right error type."""
    e = err
    while e is not None:
        assert not isinstance(e, MemoryError), f"an allocation failed on the way to {err!r}"
        e = e.__context__


def assert_valid(params, cfg: Mamba2Config = CFG) -> None:
    """What a successful load must give: every shape and dtype as the config says."""
    assert params.embedding.shape == (cfg.padded_vocab_size, cfg.d_model)
    assert params.norm_f.shape == (cfg.d_model,)
    assert (params.lm_head is None) == cfg.tie_embeddings
    floats = (np.float16, np.float32, np.float64, np.dtype("bfloat16"))
    assert params.embedding.dtype in floats and params.norm_f.dtype == params.embedding.dtype
    layers = params.layers if isinstance(params.layers, tuple) else None
    shapes = layer_shapes(cfg)  # ours, stacked
    for field, shape in shapes.items():
        if layers is None:  # stacked layout
            arrs = [getattr(params.layers, field)]
            want = shape
        else:
            assert len(layers) == cfg.n_layer
            arrs = [getattr(lp, field) for lp in layers]
            want = shape[1:]
        for a in arrs:
            assert a.shape == want, field
            assert a.dtype == (np.float32 if field in FLOAT32_LAYER_FIELDS else params.embedding.dtype), field


def check_checkpoint(files: dict[str, bytes], *, alloc_limit: int | None = None, cfg: Mamba2Config = CFG):
    """Load a checkpoint directory of ``files``: CheckpointError, or a valid result; within the bounds."""
    files = {"config.json": CONFIG_JSON, **files}
    with _checkpoint_dir(files) as path:
        try:
            params, loaded = _bounded(lambda: mamba2.load_checkpoint(path), alloc_limit=alloc_limit)
        except CheckpointError as err:
            _assert_not_memory_error(err)
            assert str(path) in str(err), f"the error does not name the checkpoint: {err}"
            return err
        assert loaded == cfg
        assert_valid(params, cfg)
        return None


def _flip(raw: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for pos, xor in flips:
        out[pos % len(out)] ^= xor
    return bytes(out)


_flips = st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), min_size=1, max_size=8)


def test_valid_files_load():
    """The fuzzers' starting points are valid: each loads to exactly the state dict."""
    for files in ({"model.safetensors": ST_BYTES}, {"pytorch_model.bin": BIN_BYTES},
                  {"model.safetensors.index.json": json.dumps(INDEX).encode(), **SHARDS}):
        with _checkpoint_dir({"config.json": CONFIG_JSON, **files}) as path:
            params, cfg = mamba2.load_checkpoint(path)
        assert cfg == CFG
        assert_valid(params)
        assert_params_match(params, cfg, SD)


def test_valid_torch_archive_matches_torch_save(tmp_path):
    """The stdlib-written archive reads like one torch.save writes (when torch is installed)."""
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in SD.items()}, buf)
    assert check_checkpoint({"pytorch_model.bin": buf.getvalue()}) is None


# ------------------------------------------------------------------------------ safetensors
@fuzz(25, cut=st.integers(0, len(ST_BYTES) - 1))
def test_safetensors_truncated(cut):
    assert check_checkpoint({"model.safetensors": ST_BYTES[:cut]}) is not None


@fuzz(40, flips=_flips)
def test_safetensors_byte_flips(flips):
    check_checkpoint({"model.safetensors": _flip(ST_BYTES, flips)})


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(ABSURD),
                          st.floats(allow_nan=True), st.text(max_size=12))
_json = st.recursive(_json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                          max_size=4),
                     max_leaves=12)
_dims = st.one_of(st.integers(-3, 300), st.sampled_from(ABSURD), st.sampled_from([-(2**63), -1]))
_safetensors_field = st.one_of(
    st.tuples(st.just("dtype"), st.one_of(
        st.sampled_from(["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL",
                         "F8_E4M3", "F8_E5M2", "C64", "F4", "f16", "", "F16\x00", "\u00e9"]), _json)),
    st.tuples(st.just("shape"), st.one_of(st.lists(_dims, max_size=4), _json)),
    st.tuples(st.just("data_offsets"), st.one_of(st.lists(_dims, min_size=2, max_size=2), _json)),
    st.tuples(st.just("extra"), _json),
)


@fuzz(60, edits=st.lists(st.tuples(st.integers(0, len(SD)), _safetensors_field), min_size=1, max_size=3))
def test_safetensors_header_fields(edits):
    """Rewritten header fields: wrong dtypes, absurd / negative / overlapping offsets, shapes whose
    product overflows or claims terabytes; the data stays a few KB."""
    header, data = _split_safetensors(ST_BYTES)
    names = sorted(k for k in header if k != "__metadata__")
    for which, (key, value) in edits:
        if which == len(names):
            header["__metadata__"] = value
        else:
            header[names[which]][key] = value
    check_checkpoint({"model.safetensors": _join_safetensors(header, data)}, alloc_limit=ALLOC_LIMIT)


@pytest.mark.parametrize("shape,offsets", [
    ([2**40], [0, 2**41]),  # a 2 TB tensor in a 3 KB file
    ([2**32, 2**32, 2**32], [0, 2]),  # shape product overflows u64
    ([2**62], [0, 2**63]),
    ([16, 8], [-2, 254]),
    ([16, 8], [2**64 - 2, 2**64 + 254]),
])
def test_safetensors_absurd_sizes(shape, offsets):
    header, data = _split_safetensors(ST_BYTES)
    header["backbone.embedding.weight"].update(shape=shape, data_offsets=offsets)
    assert check_checkpoint({"model.safetensors": _join_safetensors(header, data)}, alloc_limit=ALLOC_LIMIT)


@pytest.mark.parametrize("length", ABSURD + [0, 7, len(ST_BYTES)])
def test_safetensors_header_length(length):
    """The 8-byte header length claiming up to 2^64 - 1 bytes."""
    raw = struct.pack("<Q", length % 2**64) + ST_BYTES[8:]
    assert check_checkpoint({"model.safetensors": raw}, alloc_limit=ALLOC_LIMIT)


_SAME_SIZE_INT = {"F16": ("I16", "ShortStorage"), "F32": ("I32", "IntStorage")}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("name", ["backbone.embedding.weight", "backbone.layers.1.mixer.A_log",
                                  "backbone.norm_f.weight", "backbone.layers.0.mixer.conv1d.weight"])
def test_non_floating_dtypes_are_named(fmt, name):
    """An integer dtype of the same size on any tensor (not only in_proj): named, not silently cast."""
    code, storage = _SAME_SIZE_INT[{np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}[SD[name].dtype]]
    if fmt == "safetensors":
        header, data = _split_safetensors(ST_BYTES)
        header[name]["dtype"] = code
        files = {"model.safetensors": _join_safetensors(header, data)}
    else:
        entries = [(k, _p_tensor(storage if k == name else _STORAGE[v.dtype], str(n), v.size, 0, v.shape,
                                 _contiguous_strides(v.shape))) for n, (k, v) in enumerate(SD.items())]
        files = {"pytorch_model.bin": _zip_bytes(_p_state_dict(entries), STORAGES)}
    err = check_checkpoint(files)
    assert err is not None and f"tensor {name} has non-floating dtype" in str(err)


# ------------------------------------------------------------------------------ JSON surfaces
def _deep(depth: int, kind: str) -> bytes:
    return {"list": b"[" * depth + b"]" * depth,
            "dict": b'{"a":' * depth + b"1" + b"}" * depth,
            "open": b"[" * depth}[kind]


BAD_JSON = {
    "deep-list": _deep(100_000, "list"),
    "deep-dict": _deep(100_000, "dict"),
    "deep-unclosed": _deep(100_000, "open"),
    "not-utf8": b'{"d_model": "\xff\xfe\xc3\x28"}',
    "utf16": '{"d_model": 1}'.encode("utf-16"),
    "huge-int": b'{"d_model": 1' + b"0" * 5000 + b"}",
    "nul": b"\x00" * 64,
    "empty": b"",
    "nan": b"NaN",
}


def _with_deep(obj: dict, key: str, kind: str) -> bytes:
    """``obj`` with the value of ``key`` replaced by 100k nested lists/objects."""
    text = json.dumps({**obj, key: "@@deep@@"})
    assert text.count('"@@deep@@"') == 1
    return text.replace('"@@deep@@"', _deep(100_000, kind).decode()).encode()


@pytest.mark.parametrize("bad", BAD_JSON, ids=list(BAD_JSON))
def test_config_json_bad_bytes(bad):
    with _checkpoint_dir({"config.json": BAD_JSON[bad]}) as path:
        with pytest.raises(ValueError, match="config.json") as info:
            _bounded(lambda: Mamba2Config.from_json(path / "config.json"))
        assert type(info.value) is ValueError
        err = check_checkpoint({"config.json": BAD_JSON[bad], "model.safetensors": ST_BYTES})
        assert err is not None and "config.json" in str(err)


@pytest.mark.parametrize("kind", ["list", "dict"])
@pytest.mark.parametrize("key", ["ssm_cfg", "d_model", "attn_layer_idx"])
def test_config_json_deep_field(kind, key):
    raw = _with_deep(CFG.to_mamba_ssm_dict(), key, kind)
    with _checkpoint_dir({"config.json": raw}) as path:
        with pytest.raises(ValueError, match="config.json"):
            _bounded(lambda: Mamba2Config.from_json(path / "config.json"))


@pytest.mark.parametrize("bad", BAD_JSON, ids=list(BAD_JSON))
def test_index_json_bad_bytes(bad):
    err = check_checkpoint({"model.safetensors.index.json": BAD_JSON[bad], **SHARDS})
    assert err is not None and "model.safetensors.index.json" in str(err)


@pytest.mark.parametrize("bad", BAD_JSON, ids=list(BAD_JSON))
def test_safetensors_header_bad_json(bad):
    _, data = _split_safetensors(ST_BYTES)
    assert check_checkpoint({"model.safetensors": _join_safetensors(BAD_JSON[bad], data)}, alloc_limit=ALLOC_LIMIT)


def _tokenizer_json() -> bytes:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE({"<|endoftext|>": 0, "h": 1, "e": 2, "l": 3, "o": 4, "he": 5, "ll": 6, "hell": 7},
                               [("h", "e"), ("l", "l"), ("he", "ll")], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok.to_str().encode()


TOKENIZER_JSON = _tokenizer_json()


def check_tokenizer(raw: bytes):
    """``load_tokenizer`` on a tokenizer.json of ``raw``: a Tokenizer, or ValueError naming the file."""
    from tokenizers import Tokenizer

    with _checkpoint_dir({"tokenizer.json": raw}) as path:
        try:
            tok = _bounded(lambda: mamba2.load_tokenizer(path))
        except ValueError as err:
            assert "tokenizer.json" in str(err)
            return err
        assert isinstance(tok, Tokenizer)
        tok.encode(_PROBE_TEXT)  # what load_tokenizer checked: it encodes
        return None


@pytest.mark.parametrize("bad", BAD_JSON, ids=list(BAD_JSON))
def test_tokenizer_json_bad_bytes(bad):
    assert check_tokenizer(BAD_JSON[bad]) is not None


# ------------------------------------------------------------------------------ config.json
_CONFIG_DICTS = [CFG.to_mamba_ssm_dict(), CFG.to_transformers_dict()]


def _paths(obj, prefix=()):
    """Every key path into a nested JSON object."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _set_path(obj, path, value, delete=False):
    for k in path[:-1]:
        obj = obj[k]
    if delete and isinstance(obj, dict):
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


_config_value = st.one_of(_json, st.sampled_from([0, -1, 1, 2, 3, 4, 8, 16, 1.5, 2.0, 1e308, 1e400, -1e400,
                                                  10**4000, 2**63, "Mamba2", "mamba2", {"__float__": "Infinity"},
                                                  [0.0, 1.0], [1.0, 0.0]]))


@fuzz(80, fmt=st.sampled_from([0, 1]), edits=st.lists(
    st.tuples(st.integers(0, 10**6), _config_value, st.booleans()), min_size=1, max_size=4))
def test_config_fields(fmt, edits):
    """Random values in random fields (or fields deleted) of a valid mamba_ssm / transformers config."""
    data = copy.deepcopy(_CONFIG_DICTS[fmt])
    for which, value, delete in edits:
        paths = list(_paths(data))
        if paths:
            _set_path(data, paths[which % len(paths)], copy.deepcopy(value), delete)
    try:
        raw = json.dumps(data).encode()
    except ValueError:  # an int beyond str()'s digit limit: write it ourselves
        raw = json.dumps(data, default=str).encode()
    check_config(raw)


def check_config(raw: bytes):
    with _checkpoint_dir({"config.json": raw}) as path:
        try:
            cfg = _bounded(lambda: Mamba2Config.from_json(path / "config.json"))
        except ValueError as err:
            assert type(err) is ValueError and "config.json" in str(err), repr(err)
            return err
    assert isinstance(cfg, Mamba2Config)
    hash(cfg)  # a static jit argument
    assert Mamba2Config.from_dict(cfg.to_mamba_ssm_dict()) == cfg
    for name in ("d_model", "n_layer", "vocab_size", "d_state", "headdim", "ngroups", "d_conv", "expand"):
        assert type(getattr(cfg, name)) is int and getattr(cfg, name) >= 1
    assert cfg.d_inner % cfg.headdim == 0 and cfg.nheads % cfg.ngroups == 0
    assert all(math.isfinite(getattr(cfg, n)) for n in ("dt_min", "dt_max", "dt_init_floor", "norm_eps"))
    return None


@fuzz(30, cut=st.integers(0, len(CONFIG_JSON) - 1), flips=st.lists(st.tuples(st.integers(0, 2**31),
                                                                              st.integers(1, 255)), max_size=4))
def test_config_bytes(cut, flips):
    raw = CONFIG_JSON if not flips else _flip(CONFIG_JSON, flips)
    check_config(raw[:cut] if not flips else raw)


@pytest.mark.parametrize("n_layer", [10**9, 10**18, 10**4000])
def test_config_huge_sizes_against_small_checkpoint(n_layer):
    """A config claiming billions of layers for a 3 KB checkpoint: a prompt CheckpointError, no
    per-expected-tensor work or allocation."""
    data = CFG.to_mamba_ssm_dict()
    data["n_layer"] = n_layer
    err = check_checkpoint({"config.json": json.dumps(data).encode(), "model.safetensors": ST_BYTES},
                           alloc_limit=ALLOC_LIMIT)
    assert err is not None and "n_layer" in str(err)


# ------------------------------------------------------------------------------ sharded index
_index_edit = st.one_of(
    st.tuples(st.just("weight_map"), _json),
    st.tuples(st.just("value"), st.one_of(_json, st.sampled_from(
        ["/etc/passwd", "../model.safetensors", "", ".", "a\x00b", "\ud800", "config.json",
         "model-00001-of-00002.safetensors"]))),
    st.tuples(st.just("key"), st.text(max_size=20)),
    st.tuples(st.just("drop"), st.none()),
    st.tuples(st.just("root"), _json),
)


@fuzz(40, edits=st.lists(st.tuples(st.integers(0, 10**6), _index_edit), min_size=1, max_size=3))
def test_index_json_fields(edits):
    index = json.loads(json.dumps(INDEX))
    for which, (kind, value) in edits:
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if kind == "root":
            index = value
        elif kind == "weight_map" and isinstance(index, dict):
            index["weight_map"] = value
        elif isinstance(wm, dict) and wm:
            key = sorted(wm)[which % len(wm)]
            if kind == "value":
                wm[key] = value
            elif kind == "key":
                wm[value] = wm.pop(key)
            else:
                del wm[key]
    raw = json.dumps(index, ensure_ascii=True).encode()
    check_checkpoint({"model.safetensors.index.json": raw, **SHARDS})


@pytest.mark.parametrize("shard", ["/etc/passwd", "../model.safetensors", "sub/model.safetensors", ".", "..", ""])
def test_index_shards_outside_the_directory(shard):
    index = json.loads(json.dumps(INDEX))
    index["weight_map"]["backbone.norm_f.weight"] = shard
    err = check_checkpoint({"model.safetensors.index.json": json.dumps(index).encode(), **SHARDS})
    assert err is not None and "outside the checkpoint directory" in str(err)


def test_index_tensor_in_two_shards():
    name = _SHARD_NAMES[0]  # in shard 1, and now in shard 2 as well
    both = {k: SD[k] for k in _SHARD_NAMES[1::2] + [name]}
    shards = dict(SHARDS, **{"model-00002-of-00002.safetensors": _safetensors_bytes(both)})
    err = check_checkpoint({"model.safetensors.index.json": json.dumps(INDEX).encode(), **shards})
    assert err is not None and f"tensor {name} is stored in both" in str(err)


@fuzz(25, cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)),
                                                   max_size=4), shard=st.sampled_from(sorted(SHARDS)))
def test_index_and_shard_bytes(cut, flips, shard):
    """A truncated or byte-flipped index file, or a byte-flipped shard."""
    raw = json.dumps(INDEX).encode()
    files = dict(SHARDS)
    if flips:
        files[shard] = _flip(files[shard], flips)
    else:
        raw = raw[:cut]
    check_checkpoint({"model.safetensors.index.json": raw, **files})


# ------------------------------------------------------------------------------ torch zip archives
@fuzz(25, cut=st.integers(0, len(BIN_BYTES) - 1))
def test_bin_truncated(cut):
    assert check_checkpoint({"pytorch_model.bin": BIN_BYTES[:cut]}, alloc_limit=ALLOC_LIMIT) is not None


@fuzz(40, flips=_flips)
def test_bin_byte_flips(flips):
    """Flips anywhere in the archive: zip structures, the pickle, the storages (caught by the CRC)."""
    check_checkpoint({"pytorch_model.bin": _flip(BIN_BYTES, flips)}, alloc_limit=ALLOC_LIMIT)


_OPCODES = [bytes([c]) for c in b"()0123FGIJKLMNPQRSTUVXabcdeghijklmopqrstu}~\x80\x81\x82\x83\x84\x85\x86\x87"
            b"\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98"]
_pickle_edit = st.tuples(
    st.integers(0, len(PKL) - 1),
    st.sampled_from(["insert", "replace", "delete"]),
    st.one_of(st.sampled_from(_OPCODES),
              st.tuples(st.sampled_from(_OPCODES), st.binary(max_size=9)).map(b"".join),
              st.sampled_from([b"r\xff\xff\xff\x7f", b"r\xff\xff\xff\xff", b"q\xff", b"p2147483647\n",
                               b"\x8e" + struct.pack("<Q", 2**40), b"\x96" + struct.pack("<Q", 2**40),
                               b"B\xff\xff\xff\x7f", b"\x95" + struct.pack("<Q", 2**40),
                               b"\x8d" + struct.pack("<Q", 2**62), b"\x8b\xff\xff\xff\x7f", b"g99999999\n"]),
              st.binary(min_size=1, max_size=6)),
)


@fuzz(60, edits=st.lists(_pickle_edit, min_size=1, max_size=4))
def test_bin_pickle_opcodes(edits):
    """Opcodes inserted into, replaced in or deleted from data.pkl, including ones declaring huge memo
    indices and byte lengths (which the C unpickler would allocate before reading)."""
    pkl = bytearray(PKL)
    for pos, kind, blob in edits:
        pos %= len(pkl)
        if kind == "insert":
            pkl[pos:pos] = blob
        elif kind == "replace":
            pkl[pos:pos + len(blob)] = blob
        else:
            del pkl[pos:pos + len(blob)]
    check_checkpoint({"pytorch_model.bin": _zip_bytes(bytes(pkl), STORAGES)}, alloc_limit=ALLOC_LIMIT)


_geometry_int = st.one_of(st.integers(-2, 600), st.sampled_from(ABSURD), st.sampled_from([-(2**63), -(2**70)]))


@fuzz(60, which=st.integers(0, len(SD) - 1), numel=_geometry_int, offset=_geometry_int,
      size=st.one_of(st.none(), st.lists(_geometry_int, max_size=3)),
      stride=st.one_of(st.none(), st.lists(_geometry_int, max_size=3)),
      storage_type=st.sampled_from(["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage",
                                    "LongStorage", "BoolStorage", "ByteStorage", "ComplexFloatStorage",
                                    "UntypedStorage", "Storage"]),
      big_endian=st.booleans())
def test_bin_tensor_geometry(which, numel, offset, size, stride, storage_type, big_endian):
    """One tensor's storage type, element count, offset, size and stride rewritten: storages declared larger
    than the archive, views reaching outside their storage, negative and overflowing values."""
    name = sorted(SD)[which]
    entries = []
    for n, (k, v) in enumerate(SD.items()):
        args = [_STORAGE[v.dtype], str(n), v.size, 0, v.shape, _contiguous_strides(v.shape)]
        if k == name:
            args = [storage_type, str(n), numel, offset, v.shape if size is None else size,
                    _contiguous_strides(v.shape) if stride is None else stride]
        entries.append((k, _p_tensor(*args)))
    storages = STORAGES
    if big_endian:
        storages = {k: np.frombuffer(b, _dtype_of(k)).byteswap().tobytes() for k, b in STORAGES.items()}
    zip_bytes = _zip_bytes(_p_state_dict(entries), storages, b"big" if big_endian else b"little")
    check_checkpoint({"pytorch_model.bin": zip_bytes}, alloc_limit=ALLOC_LIMIT)


def _dtype_of(key: str) -> np.dtype:
    return list(SD.values())[int(key)].dtype


def _patch_zip_sizes(raw: bytes, member: str, size: int) -> bytes:
    """Rewrite the sizes the local and central headers of ``member`` declare (the data stays)."""
    out = bytearray(raw)
    name = member.encode()
    for sig, off in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):
        pos = 0
        while (pos := out.find(sig, pos)) >= 0:
            nlen_at = 26 if sig == b"PK\x03\x04" else 28
            nlen = struct.unpack("<H", out[pos + nlen_at:pos + nlen_at + 2])[0]
            hdr = 30 if sig == b"PK\x03\x04" else 46
            if out[pos + hdr:pos + hdr + nlen] == name:
                out[pos + off:pos + off + 8] = struct.pack("<II", size, size)
            pos += 4
    return bytes(out)


@pytest.mark.parametrize("size", [2**32 - 1, 2**31, 10**6])
@pytest.mark.parametrize("member", ["archive/data/0", "archive/data.pkl", "archive/byteorder"])
def test_bin_member_declared_larger_than_archive(member, size):
    """Zip headers declaring a member (a storage, the pickle, the byteorder record) far larger than the
    archive; the pickle declares the storage that large too."""
    numel = size // 2
    entries = [(k, _p_tensor(_STORAGE[v.dtype], str(n), numel if n == 0 else v.size, 0, v.shape,
                             _contiguous_strides(v.shape))) for n, (k, v) in enumerate(SD.items())]
    raw = _patch_zip_sizes(_zip_bytes(_p_state_dict(entries), STORAGES), member, size)
    assert check_checkpoint({"pytorch_model.bin": raw}, alloc_limit=ALLOC_LIMIT) is not None


# -- hostile pickles -------------------------------------------------------------------------------------
FLAG: list[str] = []


def pwn(*args, **kwargs):
    """A global a hostile pickle names: records that it ran."""
    FLAG.append("pwned")
    return {}


class Pwn:
    def __init__(self, *args):
        FLAG.append("pwned")

    def __new__(cls, *args):
        FLAG.append("pwned")
        return super().__new__(cls)

    def __setstate__(self, state):
        FLAG.append("pwned")


EVIL_GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                ("subprocess", "Popen"), ("builtins", "getattr"), ("builtins", "__import__"),
                ("importlib", "import_module"), ("shutil", "rmtree"), ("tests.test_fuzz_loaders", "pwn"),
                ("tests.test_fuzz_loaders", "Pwn"), ("torch", "load"), ("numpy.core.multiarray", "_reconstruct"),
                ("collections", "OrderedDict.fromkeys"), ("torch._utils", "_rebuild_tensor_v2.__globals__"),
                ("__builtin__", "eval"), ("copyreg", "_reconstructor"), ("functools", "partial")]


def _evil_args(marker: Path, module: str, name: str) -> bytes:
    if (module, name) == ("subprocess", "Popen"):
        return _p_tuple([b"](" + _p_str("touch") + _p_str(str(marker)) + b"e"])
    if name in ("eval", "exec"):
        return _p_tuple([_p_str(f"open({str(marker)!r}, 'w').close()")])
    return _p_tuple([_p_str(f"touch {marker}")])


def _evil_pickles(module: str, name: str, args: bytes) -> dict[str, bytes]:
    g = _p_global(module, name)
    sg = _p_str(module) + _p_str(name) + b"\x93"  # STACK_GLOBAL
    od = _p_global("collections", "OrderedDict") + b")R"
    return {
        "REDUCE": b"\x80\x02" + g + args + b"R.",
        "STACK_GLOBAL": b"\x80\x04" + sg + args + b"R.",
        "INST": b"(" + args[1:-1] + b"i" + module.encode() + b"\n" + name.encode() + b"\n.",
        "OBJ": b"\x80\x02(" + g + args[1:-1] + b"o.",
        "NEWOBJ": b"\x80\x02" + g + args + b"\x81.",
        "NEWOBJ_EX": b"\x80\x04" + sg + args + b"}\x92.",
        "BUILD": b"\x80\x02" + od + b"}" + _p_str("__setstate__") + g + b"s" + b"b.",
        "BUILD-slotstate": b"\x80\x02" + od + b"N}" + _p_str("x") + g + args + b"Rs\x86b.",
        "nested-in-state-dict": b"\x80\x02" + od + b"(" + _p_str("backbone.embedding.weight") + g + args
                                + b"Ru.",
        "persistent-id": b"\x80\x02" + od + b"(" + _p_str("w") + g + args + b"RQu.",
        "after-valid-tensors": PKL[:-2] + _p_str("zz") + g + args + b"Ru.",
    }


@pytest.mark.parametrize("opcode", list(_evil_pickles("m", "n", b"()")))
@pytest.mark.parametrize("module,name", EVIL_GLOBALS, ids=[f"{m}.{n}" for m, n in EVIL_GLOBALS])
def test_hostile_pickle_globals_never_run(tmp_path, module, name, opcode):
    marker = tmp_path / "pwned"
    pkl = _evil_pickles(module, name, _evil_args(marker, module, name))[opcode]
    FLAG.clear()
    err = check_checkpoint({"pytorch_model.bin": _zip_bytes(pkl, STORAGES)})
    assert not marker.exists() and not FLAG, "a global named by the pickle ran"
    assert err is not None
    if opcode != "INST" or module != "builtins" or name not in ("eval", "exec"):
        assert "refusing to load global" in str(err) or "not a loadable tensor state dict" in str(err)


def _exponential(depth: int) -> bytes:
    """A pickled object of ``depth`` nested pairs sharing their halves (DUP): a few bytes, 2**depth leaves
    to a plain ``repr``."""
    return b")" + b"2\x86" * depth


@pytest.mark.parametrize("where", ["persistent id", "storage type", "size", "stride", "offset"])
def test_hostile_pickle_error_messages_stay_small(where):
    """Error messages quote what the pickle held, bounded: a shared nested tuple must not be expanded."""
    big = _exponential(200)
    good = _p_tuple([_p_str("storage"), _p_global("torch", "FloatStorage"), _p_str("0"), _p_str("cpu"),
                     _p_int(4)]) + b"Q"
    parts = {"persistent id": [big + b"Q", _p_int(0), _p_tuple([_p_int(2)]), _p_tuple([_p_int(1)])],
             "storage type": [_p_tuple([_p_str("storage"), big, _p_str("0"), _p_str("cpu"), _p_int(4)]) + b"Q",
                              _p_int(0), _p_tuple([_p_int(2)]), _p_tuple([_p_int(1)])],
             "size": [good, _p_int(0), _p_tuple([big]), _p_tuple([_p_int(1)])],
             "stride": [good, _p_int(0), _p_tuple([_p_int(2)]), _p_tuple([big])],
             "offset": [good, big, _p_tuple([_p_int(2)]), _p_tuple([_p_int(1)])]}[where]
    pkl = _p_state_dict([("w", _p_global("torch._utils", "_rebuild_tensor_v2") + _p_tuple(parts) + b"R")])
    err = check_checkpoint({"pytorch_model.bin": _zip_bytes(pkl, STORAGES)}, alloc_limit=ALLOC_LIMIT)
    assert err is not None and len(str(err)) < 2000


def test_hostile_pickle_build_cannot_rewrite_checked_geometry():
    """BUILD on an already checked tensor must not change it: a dataclass's ``__setstate__`` (or its
    ``__dict__``, which bypasses ``frozen``, or setattr with a slot state) would let a pickle move the
    tensor's offset past the end of its storage after the bounds check, and the read go out of bounds."""
    name = "backbone.norm_f.weight"
    small = _p_tuple([_p_str("storage"), _p_global("torch", "FloatStorage"), _p_str("0"), _p_str("cpu"),
                      _p_int(1)]) + b"Q"
    geometry = [small, _p_int(2**20), _p_tuple([_p_int(CFG.d_model)]), _p_tuple([_p_int(1)])]
    as_dict = b"}(" + b"".join(_p_str(k) + v for k, v in zip(("storage", "offset", "shape", "stride"), geometry,
                                                             strict=True)) + b"u"
    for build in (_p_tuple(geometry) + b"b",  # __setstate__(tuple), as dataclass(slots=True) defines
                  as_dict + b"b",  # __dict__.update
                  b"N" + as_dict + b"\x86b"):  # setattr from a slot state
        entries = []
        for n, (k, v) in enumerate(SD.items()):
            t = _p_tensor(_STORAGE[v.dtype], str(n), v.size, 0, v.shape, _contiguous_strides(v.shape))
            entries.append((k, t + build if k == name else t))
        err = check_checkpoint({"pytorch_model.bin": _zip_bytes(_p_state_dict(entries), STORAGES)},
                               alloc_limit=ALLOC_LIMIT)
        assert err is not None and "not a loadable tensor state dict" in str(err)


# ------------------------------------------------------------------------------ tokenizer.json
@fuzz(20, cut=st.integers(0, len(TOKENIZER_JSON) - 1))
def test_tokenizer_truncated(cut):
    check_tokenizer(TOKENIZER_JSON[:cut])


@fuzz(30, flips=_flips)
def test_tokenizer_byte_flips(flips):
    check_tokenizer(_flip(TOKENIZER_JSON, flips))


_tokenizer_value = st.one_of(_config_value, st.sampled_from([
    {"strategy": {"Fixed": 2**62}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
     "pad_token": "<|endoftext|>"},
    {"max_length": 0, "stride": 5, "strategy": "LongestFirst", "direction": "Right"},
    {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "zz", "type_id": 0}}], "pair": [],
     "special_tokens": {}},
    {"type": "Split", "pattern": {"Regex": "(" * 5000}, "behavior": "Isolated", "invert": False},
    [["h", "zz"]], ["h zz", "q"], {"h": 2**32 - 1}, "<|endoftext|>",
]))


@fuzz(50, edits=st.lists(st.tuples(st.integers(0, 10**6), _tokenizer_value, st.booleans()), min_size=1,
                         max_size=3))
def test_tokenizer_fields(edits):
    """Random values in random fields (or fields deleted) of a valid tokenizer.json."""
    data = json.loads(TOKENIZER_JSON)
    for which, value, delete in edits:
        paths = list(_paths(data))
        if paths:
            _set_path(data, paths[which % len(paths)], copy.deepcopy(value), delete)
    check_tokenizer(json.dumps(data, default=str).encode())


def test_tokenizer_deep_nesting_in_a_field():
    data = json.loads(TOKENIZER_JSON)
    for key in ("model", "added_tokens", "normalizer"):
        assert check_tokenizer(_with_deep(data, key, "list")) is not None

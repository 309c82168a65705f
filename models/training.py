"""Training Mamba-2 from text or token ids: the loop behind ``ssdkit train``.

Data → documents (one per file of a folder; a single file or a ``.npy`` stream is one document, split
at ``doc_separator`` if given) → held-out split by document (or the stream's tail when there is only
one) → packed rows of ``seq_len`` with ``segment_ids`` (``ssdkit.training.data``) → batches by step
(deterministic from the seed, so resuming reads what an uninterrupted run would). Each step is
``ssdkit.make_train_step`` over ``mamba2.loss``; every ``eval_every`` steps the held-out loss and bits per
byte; every ``save_every`` steps the full train state (``ssdkit.training.checkpoints``) and the weights in
transformers' format (``out/model``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from ssdkit import MixerLM
from ssdkit.core.layers import REMAT_POLICIES
from ssdkit.models import archs, corpus, mamba2, text
from ssdkit.models.corpus import CorpusManifest
from ssdkit.models.text import Document
from ssdkit.training.data import ByteTokenizer, PackedRows, RowSampler, pack_documents, split_documents
from ssdkit.training.step import warmup_cosine

MODEL_FLAGS = ("d_model", "n_layer", "d_state", "headdim", "chunk_size", "expand", "ngroups")
#: (field, low, high, high included) for the float settings; the ones in POSITIVE exclude 0 too
FLOAT_RANGES = (("lr", 0.0, 1.0, True), ("min_lr_ratio", 0.0, 1.0, True), ("weight_decay", 0.0, 1.0, True),
                ("clip_norm", 0.0, math.inf, False), ("b1", 0.0, 1.0, False), ("b2", 0.0, 1.0, False),
                ("held_out", 0.0, 1.0, False))
POSITIVE = frozenset({"lr", "clip_norm"})
#: ``--compute-dtype`` values (:func:`resolve_compute_dtype`)
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
    """What a compute-dtype setting means on this backend: the dtype the step casts the weight matrices to
    (``ssdkit.training.step.cast_matrices``; float32 = no cast) and the dtype their whole-sequence products
    run in (``ssdkit.sequence_matmul_dtype``: float32 for bfloat16 weights where bfloat16 products are the
    slower), with the reason in words."""

    setting: str  # auto, float32 or bfloat16
    weights: str  # float32 or bfloat16
    products: str  # float32 or bfloat16
    reason: str

    def describe(self) -> str:
        """One line for the run's log."""
        what = (self.weights if self.weights == self.products
                else f"{self.weights} weights, {self.products} products")
        return f"compute dtype {self.setting}: {what} ({self.reason})"


def resolve_compute_dtype(setting: str, backend: str | None = None) -> ComputeDtype:
    """``auto``: bfloat16 where bfloat16 products are the faster on ``backend`` (default JAX's), else float32
    (``ssdkit.matmul_probe.half_products``: GPU and TPU yes; a CPU by its probe, cached per machine kind;
    ``SSDKIT_HALF_MATMUL`` overrides). ``float32`` and ``bfloat16`` are taken as given."""
    from ssdkit import matmul_probe

    if setting not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {setting!r}")
    if setting == "float32":
        return ComputeDtype(setting, "float32", "float32", "as asked")
    backend = backend or jax.default_backend()
    env = matmul_probe.HalfMatmul.from_env()
    if env is not matmul_probe.HalfMatmul.AUTO:
        reason = f"{matmul_probe.ENV_VAR}={env.value}"
    elif backend != "cpu":
        reason = f"{backend}: bfloat16 products"
    else:
        reason = matmul_probe.probe().describe()
    half = matmul_probe.half_products(backend)
    weights = "bfloat16" if setting == "bfloat16" or half else "float32"
    return ComputeDtype(setting, weights, "bfloat16" if half else "float32", reason)


#: ``ssdkit train --help``: each TrainRunConfig field's group and one line (tests/test_training_cli.py checks
#: that every field has one); the flag's help adds the field's default.
HELP = {
    "data": ("data", "a text file, a folder of text files (each a document), a .npy of token ids, or a named "
                     "corpus: python-stdlib (the Python standard library's sources), python-packages (the "
                     "installed third-party packages' sources) or python-code (both)"),
    "tokenizer": ("data", "a tokenizer.json or a folder holding one; bpe:N learns a byte-level BPE of N ids "
                          "from the training split first; without one, bytes (257 ids)"),
    "doc_separator": ("data", "split a single text file into documents at this string"),
    "encoding": ("data", "with --tokenizer: how files are decoded to text; bytes are read as is"),
    "errors": ("data", "with --tokenizer: undecodable bytes: strict (refuse, naming file and offset), replace, "
                       "ignore"),
    "held_out": ("data", "fraction of the documents held out for evaluation, in [0, 1)"),
    "arch": ("model", "mamba2; a shipped mixer (retention, gla, deltanet, gated-deltanet: "
                     "ssdkit.models.archs.MIXERS); or package.module:Class, your own ssdkit.Mixer"),
    "model": ("model", "a Mamba-2 preset (130m, 370m, ...) instead of the shape flags"),
    "init_from": ("model", "a checkpoint folder to start from (its weights and shape)"),
    "d_model": ("model", "width of the residual stream"),
    "n_layer": ("model", "number of layers"),
    "d_state": ("model", "state size N per head"),
    "headdim": ("model", "channels per head P"),
    "chunk_size": ("model", "chunk length of the chunked scan, in tokens"),
    "expand": ("model", "inner width = expand x d_model"),
    "ngroups": ("model", "groups of heads sharing B and C"),
    "lr": ("optimiser", "peak learning rate, in (0, 1]"),
    "warmup_steps": ("optimiser", "steps of linear warm-up from 0"),
    "min_lr_ratio": ("optimiser", "final learning rate as a fraction of the peak, in [0, 1]"),
    "weight_decay": ("optimiser", "AdamW's decoupled weight decay on weight matrices, in [0, 1]"),
    "clip_norm": ("optimiser", "clip the gradient to this global L2 norm, > 0"),
    "b1": ("optimiser", "Adam's first-moment decay, in [0, 1)"),
    "b2": ("optimiser", "Adam's second-moment decay, in [0, 1)"),
    "out": ("run", "the run's folder: checkpoints/, model/, log.jsonl, loss.png"),
    "steps": ("run", "optimiser steps in all"),
    "seq_len": ("run", "tokens per row"),
    "batch_size": ("run", "rows per step"),
    "micro_batches": ("run", "split each batch into this many passes, gradients summed"),
    "compute_dtype": ("run", "auto (bfloat16 where this backend's bfloat16 products are faster: GPU, TPU, a CPU "
                             "whose probe says so; else float32), float32 or bfloat16: the weight matrices' "
                             "dtype in the step (master weights stay float32)"),
    "remat": ("run", "recompute in the backward pass: none, layer (4x less memory, as fast on CPU), matmuls"),
    "eval_every": ("run", "held-out loss every this many steps"),
    "eval_rows": ("run", "held-out rows per evaluation"),
    "save_every": ("run", "checkpoint and export every this many steps, and at the end"),
    "keep": ("run", "checkpoints kept"),
    "seed": ("run", "seed of the weights, the held-out split and the batch order"),
    "progress": ("run", "a progress bar"),
    "extend": ("run", "train a finished or stopped run beyond the --steps it began with, at its schedule's "
                      "final learning rate"),
    "mesh": ("mesh", "shard over the devices, e.g. data=4,fsdp=2 (axes data, fsdp, model, seq; docs/scaling.md)"),
}


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """Everything a training run reads (``ssdkit train`` flags or a TOML/JSON file, same names)."""

    data: str
    out: str = "runs/mamba2"
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one); None: UTF-8 bytes
    doc_separator: str | None = None  # split a single text file into documents at this string
    encoding: str = "utf-8"  # with a tokenizer.json: how files are decoded to text (the byte tokenizer reads bytes)
    errors: str = "strict"  # with a tokenizer.json: what undecodable bytes do (strict: refuse, naming file and offset)
    arch: str = "mamba2"  # mamba2, a shipped mixer's name (ssdkit.models.archs), or package.module:Class
    model: str | None = None  # a preset ("130m", ...); None: a small model from the flags below
    init_from: str | None = None  # a checkpoint directory to continue from (weights and config)
    d_model: int = 128
    n_layer: int = 2
    d_state: int = 32
    headdim: int = 32
    chunk_size: int = 64
    expand: int = 2
    ngroups: int = 1
    seq_len: int = 256
    batch_size: int = 8
    micro_batches: int = 1
    steps: int = 200
    lr: float = 3e-3
    warmup_steps: int = 20  # capped at steps - 1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    compute_dtype: str = "auto"  # resolved by resolve_compute_dtype when the run starts (a probe on CPU)
    remat: str = "layer"  # as fast as "none" on CPU and 4x less memory (docs/benchmarks.md)
    mesh: str | None = None  # e.g. "data=4,fsdp=2": shard over the devices (docs/scaling.md); None: one device
    held_out: float = 0.05
    eval_every: int = 50
    eval_rows: int = 64
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    progress: bool = True
    extend: bool = False  # train a run further than the --steps it was started with (see _resume)

    @classmethod
    def from_dict(cls, data: dict, *, source: str | None = "config") -> TrainRunConfig:
        """The config of ``data`` (option names with ``-`` or ``_``); errors name ``source`` (a config
        file) when given."""
        where = f"{source}: " if source else ""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"{where}unknown training option {key!r}")
            clean[name] = value
        if "data" not in clean:
            raise ValueError(f"{where}the training data (--data, or data = PATH in a config file) is required")
        try:
            return cls(**clean)
        except ValueError as err:
            raise ValueError(f"{where}{err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> dict:
        """The options in a ``.toml`` or ``.json`` file, as a dict (flags given on the command line win)."""
        path = Path(path)
        try:
            if path.suffix == ".toml":
                import tomllib

                return tomllib.loads(path.read_text())
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"no training config file at {path}") from None
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") from None

    def _check_types(self) -> None:
        """Each field's value has the field's type (a TOML or JSON file can hold anything): int fields take
        ints, float fields ints or floats, str fields str (or None where the default is None)."""
        for f in dataclasses.fields(self):
            v, kind = getattr(self, f.name), f.type
            if kind == "bool":
                ok, want = isinstance(v, bool), "true or false"
            elif kind == "int":
                ok, want = isinstance(v, int) and not isinstance(v, bool), "an int"
            elif kind == "float":
                ok, want = isinstance(v, int | float) and not isinstance(v, bool), "a number"
            else:
                optional = kind.endswith("| None")
                ok, want = isinstance(v, str) or (optional and v is None), "a string"
            if not ok:
                raise ValueError(f"{f.name} must be {want}, got {v!r} ({type(v).__name__})")

    def __post_init__(self):
        self._check_types()
        for name in ("seq_len", "batch_size", "micro_batches", "steps", "eval_every", "eval_rows", "save_every",
                     "keep", *MODEL_FLAGS):
            v = getattr(self, name)
            if v < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'seq_len' else 1}, got {v!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        for name, lo, hi, closed in FLOAT_RANGES:
            v = getattr(self, name)
            if not (math.isfinite(v) and lo <= v and (v <= hi if closed else v < hi)) or (name in POSITIVE and v <= 0):
                bound = f"{'(' if name in POSITIVE else '['}{lo:g}, {hi:g}{']' if closed else ')'}"
                raise ValueError(f"{name} must be a finite number in {bound}, got {v!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        text.check_decoding(self.encoding, self.errors)
        if self.tokenizer is not None and self.tokenizer.startswith("bpe:"):
            bpe_size(self.tokenizer)
        archs.check_arch(self.arch)
        if self.mesh is not None:
            from ssdkit.sharding import parse_mesh

            parse_mesh(self.mesh)
        if self.arch != "mamba2" and (self.model is not None or self.init_from is not None):
            raise ValueError(f"--model and --init-from are Mamba-2 checkpoints: not for arch={self.arch}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batches={self.micro_batches}")


@dataclasses.dataclass(frozen=True)
class TrainSummary:
    """What a finished run reports."""

    steps: int
    tokens: int
    seconds: float
    train_loss: float
    held_out_loss: float | None
    held_out_bits_per_byte: float | None
    skipped: int
    resumed_from: int | None
    compute_dtype: str  # the weight matrices' dtype in the step, as resolved (float32 or bfloat16)


# ------------------------------------------------------------------------------ data
def _file_documents(paths: list[Path], cfg: TrainRunConfig, tokenizer, separator: str | None = None
                    ) -> list[Document]:
    """The non-empty documents of ``paths`` (``text.read_file_documents``: bytes for the byte tokenizer, text
    decoded per ``cfg.encoding``/``cfg.errors`` for a tokenizer.json)."""
    return [doc for p in paths for doc in text.read_file_documents(p, tokenizer, encoding=cfg.encoding,
                                                                   errors=cfg.errors, separator=separator)]


def _texts(path: Path, cfg: TrainRunConfig, tokenizer, log: Callable[[str], None]) -> list[Document]:
    """One document per text file of a folder (sorted by path; files that are not text skipped, the counts
    logged), or a text file's (split at ``cfg.doc_separator``)."""
    if path.is_dir():
        files = text.text_files_under(path)
        log(f"[train] {files.summary()}")
        return _file_documents(files.taken, cfg, tokenizer)
    if path.is_file():
        text.check_text_file(path)
        return _file_documents([path], cfg, tokenizer, cfg.doc_separator)
    raise ValueError(f"training data {path} does not exist")


def bpe_size(spec: str) -> int:
    """N of ``--tokenizer bpe:N`` (a ValueError unless 258 <= N <= 65536)."""
    size = spec.removeprefix("bpe:")
    if not size.isdigit() or not 258 <= int(size) <= 2**16:
        raise ValueError(f"tokenizer {spec!r}: bpe:N needs N in 258..65536 (bytes, <|endoftext|>, merges)")
    return int(size)


def load_tokenizer(cfg: TrainRunConfig, *, log: Callable[[str], None] | None = None):
    """``(tokenizer, tokenizer.json path or None)`` for the run. ``bpe:N``: the BPE learnt from the training
    split (``text.train_bpe`` over the documents ``load_documents`` gives the byte tokenizer, decoded as
    ``encoding``/``errors`` say), written to ``OUT/tokenizer.json``; a resumed run reads that file back
    (its data fingerprint then checks it gives the same ids)."""
    log = log or (lambda message: None)
    if cfg.tokenizer is None or not cfg.tokenizer.startswith("bpe:"):
        return text.load(cfg.tokenizer)
    file = Path(cfg.out) / "tokenizer.json"
    if file.is_file():
        log(f"[train] the run's BPE tokenizer: {file}")
        return text.load(file)
    size = bpe_size(cfg.tokenizer)
    t = time.perf_counter()
    byte_docs, _, _ = load_documents(cfg, ByteTokenizer())
    errors = "replace" if cfg.errors == "strict" else cfg.errors  # strict files are refused when read again
    texts = (bytes(d.ids[d.ids < 256].astype(np.uint8)).decode(cfg.encoding, errors) for d in byte_docs)
    tok = text.train_bpe(texts, size)
    file.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(file))
    log(f"[train] learnt a BPE of {size} ids from {len(byte_docs)} training documents in "
        f"{time.perf_counter() - t:.1f} s: {file}")
    return text.load(file)


def load_documents(cfg: TrainRunConfig, tokenizer, *, log: Callable[[str], None] | None = None
                   ) -> tuple[list[Document], list[Document], CorpusManifest | None]:
    """The corpus as (training documents, held-out documents, the named corpus's manifest or None).

    A named corpus (``ssdkit.models.corpus``, e.g. ``python-stdlib``) is split by its own rule (a hash of each
    file's path, ``held_out`` of them); a folder or a file split at ``doc_separator`` by a seeded
    permutation of its documents; a single document (a text or a ``.npy`` stream) by its tail. Files are
    read by ``ssdkit.models.text.read_file_documents`` (the byte tokenizer sees their bytes, all of them);
    an empty corpus is a ValueError; ``log`` gets a folder's count of files taken and skipped."""
    text.check_decoding(cfg.encoding, cfg.errors)
    log = log or (lambda message: None)
    if isinstance(tokenizer, ByteTokenizer) and (cfg.encoding, cfg.errors) != ("utf-8", "strict"):
        log("[train] the byte tokenizer reads the files' bytes as they are: encoding and errors are not used")
    named = corpus.resolve(cfg.data, cfg.held_out) if cfg.held_out > 0 and not Path(cfg.data).exists() else None
    if named is not None:
        named_corpus, part = named
        if part != "all":
            raise ValueError(f"train on {named_corpus.name} (it holds out its own files), not {cfg.data}")
        train = _file_documents(named_corpus.paths("train"), cfg, tokenizer)
        held = _file_documents(named_corpus.paths("held-out"), cfg, tokenizer)
        return train, held, named_corpus.manifest()
    path = Path(cfg.data)
    if path.suffix == ".npy" and path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path} is not a numpy array of token ids: {err}") from None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{path} must hold a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
        docs = [text.Document(ids.astype(np.int32), len(ids))]
    else:
        docs = _texts(path, cfg, tokenizer, log)
    if not docs:
        raise ValueError(f"no text in {path}: " + ("its text files are all empty" if path.is_dir() else "empty"))
    if len(docs) >= 2:
        train_idx, held_idx = split_documents(len(docs), cfg.held_out, cfg.seed)
        return [docs[i] for i in train_idx], [docs[i] for i in held_idx], None
    # one document (a stream): its last held_out fraction is held out
    doc = docs[0]
    cut = len(doc.ids) - int(round(cfg.held_out * len(doc.ids)))
    head = text.Document(doc.ids[:cut], round(doc.bytes_per_token * cut))
    tail = [text.Document(doc.ids[cut:], doc.num_bytes - head.num_bytes)] if cut < len(doc.ids) else []
    return [head], tail, None


def prepare_data(cfg: TrainRunConfig, train_docs: list[Document], held_docs: list[Document]
                 ) -> tuple[PackedRows, PackedRows | None]:
    """Training rows and held-out rows (None when there are too few held-out tokens for one row)."""
    def pack(docs):
        return pack_documents([d.ids for d in docs], cfg.seq_len, bytes_per_token=[d.bytes_per_token for d in docs])

    held = pack(held_docs) if held_docs and sum(len(d.ids) for d in held_docs) >= cfg.seq_len else None
    return pack(train_docs), held


# ------------------------------------------------------------------------------ model
def _model(cfg: TrainRunConfig, vocab_size: int):
    """(params, model config) from a checkpoint directory, a preset or the flags.

    The layers are stacked: the scan over layers is where rematerialisation saves memory (XLA plans the
    unrolled per-layer stack's backward pass with every layer's activations whatever the policy)."""
    if cfg.init_from is not None:
        params, mcfg = mamba2.load_checkpoint(cfg.init_from, dtype=jnp.float32, stacked=True)
        if mcfg.padded_vocab_size < vocab_size:
            raise ValueError(f"{cfg.init_from} has a vocabulary of {mcfg.padded_vocab_size}, smaller than the "
                             f"tokenizer's {vocab_size}")
        return params, mcfg
    if cfg.arch != "mamba2":
        # A mixer on the same shape flags: heads of `headdim` channels over expand·d_model, the same state
        # size, groups and conv width (ssdkit.models.archs.lm_config).
        lm_cfg = archs.lm_config(vocab_size=vocab_size, d_conv=mamba2.Mamba2Config.d_conv,
                                 **{k: getattr(cfg, k) for k in MODEL_FLAGS})
        model = MixerLM(lm_cfg, archs.mixer(cfg.arch))
        return model.init(jax.random.key(cfg.seed)), model
    if cfg.model is not None:
        mcfg = dataclasses.replace(mamba2.Mamba2Config.preset(cfg.model), vocab_size=vocab_size)
    else:
        mcfg = mamba2.Mamba2Config(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FLAGS})
    params = mamba2.init_params(mcfg, jax.random.key(cfg.seed), stacked=True)
    return params, mcfg


def _check_vocab(rows: PackedRows, mcfg) -> None:
    hi, vocab = int(rows.tokens.max()), archs.family(mcfg).vocab_size(mcfg)
    if hi >= vocab:
        raise ValueError(f"token id {hi} in the data is out of range for the model's vocabulary of {vocab}")


# ------------------------------------------------------------------------------ the loop
def evaluate(params, mcfg, rows: PackedRows, *, batch_size: int, max_rows: int) -> tuple[float, float]:
    """Held-out (loss in nats per token, bits per byte) over up to ``max_rows`` rows."""
    n = min(len(rows), max_rows)
    nll = tokens = nbytes = 0.0
    for i in range(0, n, batch_size):
        t, s = rows.tokens[i: i + batch_size], rows.segment_ids[i: i + batch_size]
        _, m = _eval_loss(params, (jnp.asarray(t), jnp.asarray(s)), mcfg=mcfg, remat="none")
        nll += float(m.loss) * float(m.tokens)
        tokens += float(m.tokens)
        _, w = ssdkit.next_token_targets(jnp.asarray(t), segment_ids=jnp.asarray(s))
        nbytes += float(np.sum(np.asarray(w) * rows.token_bytes[i: i + batch_size, 1:]))
    return nll / max(tokens, 1.0), nll / (math.log(2) * max(nbytes, 1.0))


def _on_mesh(cfg: TrainRunConfig, mcfg, state, optimizer, log):
    """Place the train state on ``cfg.mesh``: (state, the step's shardings, the batches' placement)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from ssdkit import sharding

    mesh = sharding.make_mesh(cfg.mesh)
    family = archs.family(mcfg)
    family.check_mesh(mcfg, mesh)
    rows = sharding.batch_size_multiple(mesh)
    if (cfg.batch_size // cfg.micro_batches) % rows:
        raise ValueError(f"--mesh {cfg.mesh} splits a batch's rows {rows} ways: batch_size / micro_batches = "
                         f"{cfg.batch_size // cfg.micro_batches} must be a multiple of {rows}")
    if cfg.seq_len % mesh.shape["seq"]:
        raise ValueError(f"--mesh {cfg.mesh} splits a row's positions {mesh.shape['seq']} ways: seq_len "
                         f"{cfg.seq_len} must be a multiple of {mesh.shape['seq']}")
    param_specs = family.param_specs(state.params, mcfg, mesh)
    specs = type(state)(step=P(), params=param_specs, skipped=P(),
                        opt_state=sharding.optimizer_specs(optimizer, state.opt_state, param_specs))
    state = sharding.place(state, mesh, specs)
    batch_spec = sharding.sequence_spec(2)  # rows over (data, fsdp), positions over seq
    shardings = (sharding.named(mesh, specs), NamedSharding(mesh, batch_spec))
    log(f"[train] mesh {dict(mesh.shape)} over {mesh.size} devices")
    return state, shardings, functools.partial(sharding.place, mesh=mesh, specs=batch_spec)


#: Settings a resumed run may change: where and how it runs, not what it computes (``data`` is checked by
#: its contents; ``steps`` by the rule of :func:`_plan`). ``compute_dtype`` is one: a checkpoint holds float32
#: master weights and optimiser state whatever precision the products ran in, so a run may go on in another
#: (``auto`` resolving to bfloat16 on a machine whose bfloat16 products are faster, to float32 on one whose
#: are not); each segment's resolved dtype is recorded (``compute`` in the checkpoint and in training.json).
RESUME_FREE = frozenset({"data", "out", "mesh", "remat", "compute_dtype", "eval_every", "eval_rows", "save_every",
                         "keep", "progress", "steps", "extend"})


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What the checkpoints in ``out`` say about this call: resume from ``step`` (None: start afresh), the
    learning-rate schedule's length, and the run's totals so far (``meta``: the checkpoint's record)."""

    step: int | None
    schedule_steps: int
    meta: dict


def _settings(cfg: TrainRunConfig) -> dict:
    """The settings a checkpoint records and a resumed run must repeat."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE}


def _fingerprint(train_rows: PackedRows, held_rows: PackedRows | None) -> str:
    """SHA-256 of the packed training and held-out rows: the data as the run reads it."""
    h = hashlib.sha256()
    for rows in (train_rows, held_rows):
        if rows is not None:
            h.update(np.ascontiguousarray(rows.tokens).tobytes())
            h.update(np.ascontiguousarray(rows.segment_ids).tobytes())
    return h.hexdigest()


def _plan(cfg: TrainRunConfig, checkpointer, fingerprint: str) -> _Plan:
    """Resume from the newest complete checkpoint when there is one, refusing one of another run.

    A checkpoint records the run's settings (:func:`_settings`), its data's fingerprint, its ``--steps`` and
    its schedule's length. Any difference is refused by name. ``--steps`` may only change with ``--extend``,
    which trains further than the run was planned: the learning-rate schedule keeps its length, so the added
    steps run at its final rate (``min_lr_ratio · lr``), with no jump."""
    where = Path(cfg.out) / "checkpoints"
    step = checkpointer.latest_step()
    if step is None:
        if cfg.extend:
            raise ValueError(f"--extend: no checkpoint in {where} to extend")
        return _Plan(None, cfg.steps, {})
    meta = checkpointer.meta(step)
    if "settings" not in meta:  # written before runs recorded their settings
        if meta.get("seed") != cfg.seed or meta.get("batch_size") != cfg.batch_size:
            raise ValueError(f"{where} was written by a run with another seed or batch size; use another --out "
                             f"or the same options")
        return _Plan(step, cfg.steps, meta)
    recorded = meta["settings"]
    differ = [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in _settings(cfg).items() if recorded.get(k) != v]
    if meta.get("data") != fingerprint:
        differ.append(f"the data ({cfg.data} packs to other rows)")
    if differ:
        raise ValueError(f"{where} holds a run with other settings: {'; '.join(differ)}. Resume it with its own "
                         f"settings, or give another --out to start afresh")
    planned = meta["steps"]
    if cfg.steps != planned and not cfg.extend:
        raise ValueError(f"{where} holds a run of {planned} steps (at step {step}): --steps {cfg.steps} would change "
                         f"its learning-rate schedule. Add --extend to train it further at the schedule's final "
                         f"rate, or give another --out to start afresh")
    if cfg.extend and cfg.steps <= step:
        raise ValueError(f"--extend: --steps {cfg.steps} must be above the run's step {step} in {where}")
    return _Plan(step, meta["schedule_steps"], meta)


def _check_out(out: Path) -> None:
    """``--out`` is a folder, or can be made one (checked before anything is read or written)."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out}: no permission to write in it")
        return
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise ValueError(f"--out {out} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be created: no permission to write in {parent}")


def _json_number(x: float) -> float | None:
    """``x``, or None (JSON's null) where it is NaN or infinite: every line of log.jsonl is standard JSON."""
    return x if math.isfinite(x) else None


def _export(cfg: TrainRunConfig, params, mcfg, step: int, *, tokenizer, tokenizer_file, record: dict) -> None:
    """Write ``out/model``: the weights, tokenizer.json, and training.json (the run and its data)."""
    folder = Path(cfg.out) / "model"
    archs.family(mcfg).save(params, mcfg, folder)
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_text(json.dumps(ByteTokenizer.tokenizers_json()))
    eod = text.eod_id(tokenizer)
    if eod is not None and (folder / "config.json").exists():  # transformers reads these
        config = json.loads((folder / "config.json").read_text())
        config.update(bos_token_id=eod, eos_token_id=eod, pad_token_id=eod)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "training.json").write_text(json.dumps({"run": dataclasses.asdict(cfg), "step": step, **record},
                                                     indent=2) + "\n")


def _gathered(params):
    """Params every process holds whole (a collective: every process calls it)."""
    if all(a.is_fully_addressable for a in jax.tree_util.tree_leaves(params)):
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where the next run resumes."""


@dataclasses.dataclass
class _Interrupt:
    """SIGINT while training: the first asks the loop to stop after the step it is in (then it saves a
    checkpoint); a second stops at once (the newest checkpoint stays the resume point)."""

    asked: bool = False

    def __call__(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True


def train(cfg: TrainRunConfig, *, log: Callable[[str], None] = print) -> TrainSummary:
    """Run (or resume) a training run into ``cfg.out``; returns the summary.

    Resuming: the newest complete checkpoint in ``out/checkpoints``, when its recorded settings and data
    match (:func:`_plan`). ``log.jsonl``'s ``tokens`` and ``seconds`` count the whole run, across resumes
    (``seconds``: time spent training, compilation excluded). Ctrl-C (in the main thread) stops after the
    current step, saves a checkpoint and raises :class:`TrainingInterrupted`; a second Ctrl-C stops at once.
    Weights that become non-finite (a learning-rate schedule gone NaN) stop the run before anything is
    saved (ValueError).

    On several processes (after ``jax.distributed.initialize``, with ``cfg.mesh`` over all their devices)
    every process runs this same call on the same data; checkpoints are written by all of them (each its
    own shards), files and messages by process 0 alone."""
    from ssdkit.training.checkpoints import TrainCheckpointer

    primary = jax.process_index() == 0
    if not primary:
        log = _quiet

    out = Path(cfg.out)
    _check_out(out)
    if cfg.arch != "mamba2":  # a user's package.module:Class is imported and checked before any data is read
        archs.mixer(cfg.arch)
    tokenizer, tokenizer_file = load_tokenizer(cfg, log=log)
    train_docs, held_docs, manifest = load_documents(cfg, tokenizer, log=log)
    train_rows, held_rows = prepare_data(cfg, train_docs, held_docs)
    fingerprint = _fingerprint(train_rows, held_rows)
    checkpointer = TrainCheckpointer(out / "checkpoints", keep=cfg.keep)
    plan = _plan(cfg, checkpointer, fingerprint)
    run_log = out / "log.jsonl"
    if plan.step is not None and plan.step >= cfg.steps:
        checkpointer.close()
        return _finished(cfg, plan, run_log, log)

    try:  # Ctrl-C while loading or compiling: nothing new was saved
        params, mcfg = _model(cfg, text.vocab_size(tokenizer))
        _check_vocab(train_rows, mcfg)
        sampler = RowSampler(len(train_rows), cfg.batch_size, cfg.seed)
        warmup = min(cfg.warmup_steps, plan.schedule_steps - 1)
        optimizer = ssdkit.adamw(cfg.lr, total_steps=plan.schedule_steps, warmup_steps=warmup,
                                 min_lr_ratio=cfg.min_lr_ratio, b1=cfg.b1, b2=cfg.b2,
                                 weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
        schedule = warmup_cosine(cfg.lr, warmup_steps=warmup, total_steps=plan.schedule_steps,
                                 min_ratio=cfg.min_lr_ratio)
        state = ssdkit.TrainState.create(params, optimizer)
        shardings, put_batch = None, jnp.asarray
        if cfg.mesh is not None:  # parameters, optimiser state and batches on the mesh (ssdkit.models.mamba2.sharding)
            state, shardings, put_batch = _on_mesh(cfg, mcfg, state, optimizer, log)
        if plan.step is not None:
            state, _ = checkpointer.restore(state, plan.step)
            log(f"[train] resuming from step {plan.step} in {out / 'checkpoints'}"
                + (f" (extended from {plan.meta['steps']} to {cfg.steps} steps)" if cfg.extend else ""))
        start = int(state.step)

        out.mkdir(parents=True, exist_ok=True)
        if primary:  # the log holds the steps up to the resume point (a killed run may have logged more)
            kept = [] if plan.step is None or not run_log.exists() else [
                e for e in read_log(run_log) if e["step"] <= start]
            run_log.write_text("".join(json.dumps(e) + "\n" for e in kept))
        record = {"train_tokens": train_rows.tokens.size,
                  "held_out_tokens": 0 if held_rows is None else held_rows.tokens.size,
                  "corpus": None if manifest is None else manifest.to_dict(), "jax": jax.__version__}
        tokens_before, seconds_before = plan.meta.get("tokens", 0), plan.meta.get("seconds", 0.0)

        def batch_at(step):
            idx = sampler.indices(step)
            return put_batch(train_rows.tokens[idx]), put_batch(train_rows.segment_ids[idx])

        compute = resolve_compute_dtype(cfg.compute_dtype)
        _check_processes_agree(compute)
        log(f"[train] {compute.describe()}")
        segments = _compute_segments(plan.meta.get("compute", []), start, compute)
        if len(segments) > 1 and segments[-2]["weights"] != compute.weights:
            log(f"[train] steps {segments[-2]['from_step']}..{start} ran in {segments[-2]['weights']}; "
                f"from step {start} on: {compute.weights}")
        record["compute"] = segments
        log("[train] compiling the train step...")
        t = time.perf_counter()
        step_fn = make_step(mcfg, optimizer, remat=cfg.remat, micro_batches=cfg.micro_batches,
                            compute_dtype=compute.weights, shardings=shardings)
        step_fn = step_fn.lower(state, batch_at(start)).compile()
        log(f"[train] compiled in {time.perf_counter() - t:.1f} s")

        def save(done):
            meta = {"seed": cfg.seed, "batch_size": cfg.batch_size, "data_step": done, "settings": _settings(cfg),
                    "data": fingerprint, "steps": cfg.steps, "schedule_steps": plan.schedule_steps,
                    "tokens": tokens_before + tokens_seen, "seconds": round(seconds_before + elapsed, 3),
                    "skipped": int(state.skipped), "compute": segments}
            checkpointer.save(done, state, meta)
            params = _gathered(state.params)  # every process takes part, process 0 writes
            if primary:
                _export(cfg, params, mcfg, done, tokenizer=tokenizer, tokenizer_file=tokenizer_file, record=record)
    except KeyboardInterrupt:
        checkpointer.close()
        raise TrainingInterrupted(f"interrupted before training: {_resume_point(plan.step, out)}") from None

    progress = _progress(cfg if primary else dataclasses.replace(cfg, progress=False), start)
    if cfg.progress and log is print:  # keep the bar intact
        from tqdm import tqdm

        log = tqdm.write
    interrupt = _Interrupt()
    handler = threading.current_thread() is threading.main_thread() and jax.process_count() == 1
    previous = signal.signal(signal.SIGINT, interrupt) if handler else None
    t0, tokens_seen, elapsed, loss, saved = time.perf_counter(), 0, 0.0, float("nan"), plan.step
    held_loss = held_bpb = None
    try:
        for step in range(start, cfg.steps):
            batch = batch_at(step)
            state, m = step_fn(state, batch)
            loss, tokens_seen = float(m.loss), tokens_seen + int(batch[0].size)
            done, elapsed = step + 1, time.perf_counter() - t0
            if not bool(m.params_finite):
                raise ValueError(f"step {done}: the weights became non-finite (NaN or Inf; learning rate "
                                 f"{float(schedule(step)):g}); stopped without saving: "
                                 + _resume_point(saved, out))
            progress(done, {"loss": f"{loss:.4f}", "lr": f"{float(schedule(step)):.2e}",
                            "tok/s": f"{tokens_seen / max(elapsed, 1e-9):,.0f}"})
            entry = {"step": done, "loss": _json_number(loss), "lr": float(schedule(step)),
                     "tokens": tokens_before + tokens_seen, "seconds": round(seconds_before + elapsed, 3)}
            if held_rows is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
                held_loss, held_bpb = evaluate(state.params, mcfg, held_rows, batch_size=cfg.batch_size,
                                               max_rows=cfg.eval_rows)
                entry.update(held_out_loss=_json_number(held_loss), held_out_bits_per_byte=_json_number(held_bpb))
                log(f"[train] step {done}: held-out loss {held_loss:.4f} nats/token, {held_bpb:.4f} bits/byte")
            if primary:
                with run_log.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if done % cfg.save_every == 0 or done == cfg.steps or interrupt.asked:
                save(done)
                saved = done
            if interrupt.asked and done < cfg.steps:
                raise TrainingInterrupted(f"interrupted after step {done}: {_resume_point(saved, out)}")
    except KeyboardInterrupt as err:
        if isinstance(err, TrainingInterrupted):
            raise
        raise TrainingInterrupted(f"interrupted: {_resume_point(saved, out)}") from None
    finally:
        if handler:
            signal.signal(signal.SIGINT, previous)
        progress(None, None)
        checkpointer.close()
    try:
        if primary:
            plot_log(run_log, out / "loss.png")
    except ImportError:
        from ssdkit.bench import BENCH_EXTRA_HINT

        log(f"[train] matplotlib is not installed ({BENCH_EXTRA_HINT}): no loss.png")
    summary = TrainSummary(steps=cfg.steps, tokens=tokens_before + tokens_seen, seconds=seconds_before + elapsed,
                           train_loss=loss, held_out_loss=held_loss, held_out_bits_per_byte=held_bpb,
                           skipped=int(state.skipped), resumed_from=plan.step, compute_dtype=compute.weights)
    log(f"[train] done: {summary.steps} steps, {summary.tokens:,} tokens in {summary.seconds:.1f} s of training "
        f"({compute.weights} compute); train loss {loss:.4f}" + ("" if held_loss is None else
                                    f", held-out loss {held_loss:.4f}, {held_bpb:.4f} bits/byte")
        + f"; {summary.skipped} non-finite steps skipped; weights in {out / 'model'}")
    return summary


def _check_processes_agree(compute: ComputeDtype) -> None:
    """On several processes, every one must run the same program: a ValueError on all of them (a collective:
    every process calls it) when their probes resolved the compute dtype differently."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.array([compute.weights == "bfloat16", compute.products == "bfloat16"], np.int32)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    if not (every == every[0]).all():
        raise ValueError(f"the processes resolved --compute-dtype {compute.setting} differently (each CPU's own "
                         f"matmul probe); set SSDKIT_HALF_MATMUL=bfloat16 or float32 for every process")


def _compute_segments(recorded: list, start: int, compute: ComputeDtype) -> list[dict]:
    """The run's compute dtypes by segment, ``{"from_step", "setting", "weights", "products"}`` each: the
    recorded ones before ``start``, then this segment's (merged into the last when it is the same)."""
    kept = [seg for seg in recorded if seg["from_step"] < start]
    this = {"from_step": start, "setting": compute.setting, "weights": compute.weights, "products": compute.products}
    if kept and {k: v for k, v in kept[-1].items() if k != "from_step"} == {k: v for k, v in this.items()
                                                                             if k != "from_step"}:
        return kept
    return [*kept, this]


def _last_compute_dtype(meta: dict) -> str:
    """The weights' dtype the checkpoint's last segment ran in (checkpoints from before ``compute`` was
    recorded: their setting, float32 or bfloat16)."""
    if meta.get("compute"):
        return meta["compute"][-1]["weights"]
    return meta.get("settings", {}).get("compute_dtype", "float32")


def _resume_point(saved: int | None, out: Path) -> str:
    """Where the next run with the same command starts."""
    if saved is None:
        return f"no checkpoint yet, so the same command starts {out} afresh"
    return f"the same command resumes from the checkpoint of step {saved} in {out / 'checkpoints'}"


def _finished(cfg: TrainRunConfig, plan: _Plan, run_log: Path, log) -> TrainSummary:
    """A run already at its last step: say so, and report its last figures (log.jsonl)."""
    entries = read_log(run_log) if run_log.exists() else []
    last = entries[-1] if entries else {}
    held = next((e for e in reversed(entries) if e.get("held_out_loss") is not None), {})
    log(f"[train] {cfg.out} already finished its {plan.step} steps: nothing to train (a larger --steps with "
        f"--extend trains it further; the weights are in {Path(cfg.out) / 'model'})")
    return TrainSummary(steps=plan.step, tokens=plan.meta.get("tokens", 0), seconds=plan.meta.get("seconds", 0.0),
                        train_loss=last.get("loss") if last.get("loss") is not None else float("nan"),
                        held_out_loss=held.get("held_out_loss"),
                        held_out_bits_per_byte=held.get("held_out_bits_per_byte"), skipped=plan.meta.get("skipped", 0),
                        resumed_from=plan.step,
                        compute_dtype=_last_compute_dtype(plan.meta))


def _quiet(message: str) -> None:
    """The log of processes other than 0."""


def make_step(mcfg: mamba2.Mamba2Config | MixerLM, optimizer, *, remat: str = "none", micro_batches: int = 1,
              compute_dtype: str = "float32", shardings=None):
    """The jitted training step of ``ssdkit train`` (and ``ssdkit bench --train``) on batches
    ``(tokens, segment_ids)``, each (batch, seq) int32: ``ssdkit.make_train_step`` over ``mamba2.loss``.
    ``compute_dtype``: float32, bfloat16, or auto (:func:`resolve_compute_dtype`)."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    weights = resolve_compute_dtype("auto").weights if compute_dtype == "auto" else compute_dtype
    loss_fn = functools.partial(_batch_loss, mcfg=mcfg, remat=remat)
    return ssdkit.make_train_step(loss_fn, optimizer, micro_batches=micro_batches,
                                  compute_dtype=None if weights == "float32" else jnp.dtype(weights),
                                  shardings=shardings)


def _batch_loss(params, batch, *, mcfg, remat):
    tokens, segment_ids = batch
    return archs.family(mcfg).loss(params, mcfg, tokens, segment_ids, remat)


_eval_loss = jax.jit(_batch_loss, static_argnames=("mcfg", "remat"))  # the model config is hashable


def _progress(cfg: TrainRunConfig, start: int):
    """``update(step, postfix)``; ``update(None, None)`` closes. A tqdm bar (step, loss, lr, tokens/s, ETA)."""
    if not cfg.progress:
        return lambda step, postfix: None
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(step, postfix):
        if step is None:
            bar.close()
            return
        bar.set_postfix(postfix, refresh=False)
        bar.update(step - bar.n)

    return update


def read_log(log_path: str | Path) -> list[dict]:
    """The entries of a run's ``log.jsonl``, in file order, leaving out a line that is not JSON (the last
    line of a run killed while writing it)."""
    entries = []
    for line in Path(log_path).read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def plot_log(log_path: str | Path, png: str | Path) -> None:
    """The loss curve of a run's ``log.jsonl``: training loss (a moving average over 1% of the steps) and
    the held-out figure against tokens seen, in bits per token (= bits per byte for the byte tokenizer)."""
    from matplotlib.figure import Figure

    entries = {e["step"]: e for e in read_log(log_path)}  # a step logged twice: the last one wins
    steps = sorted(entries)

    def number(x):  # null: a non-finite figure
        return math.nan if x is None else x

    bits = np.array([number(entries[s]["loss"]) for s in steps], np.float64) / math.log(2)
    if not np.any(np.isfinite(bits)):
        return
    tokens = np.array([entries[s]["tokens"] for s in steps], np.float64)
    width = max(1, len(steps) // 100)
    smooth = np.convolve(bits, np.ones(width) / width, mode="valid")
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    ax.plot(tokens, bits, color="0.8", lw=0.6, label="train (per step)")
    ax.plot(tokens[width - 1:], smooth, color="C0", lw=1.4, label=f"train ({width}-step mean)")
    held = [(entries[s]["tokens"], number(entries[s]["held_out_loss"]) / math.log(2)) for s in steps
            if "held_out_loss" in entries[s]]
    if held:
        ax.plot(*zip(*held, strict=True), "o-", color="C3", ms=3, lw=1.2, label="held-out")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (bits per token)")
    ax.set_ylim(bottom=0, top=min(float(np.nanmax(bits)), 3 * float(np.nanmedian(bits))) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


"""Training Mamba-2 from text or token ids: the loop behind ``ssdkit train``.

Data → documents (one per file of a folder; a single file or a ``.npy`` stream is one document, split
at ``doc_separator`` if given) → held-out split by document (or the stream's tail when there is only
one) → packed rows of ``seq_len`` with ``segment_ids`` (``ssdkit.data``) → batches by step
(deterministic from the seed, so resuming reads what an uninterrupted run would). Each step is
``ssdkit.make_train_step`` over ``mamba2.loss``; every ``eval_every`` steps the held-out loss and bits per
byte; every ``save_every`` steps the full train state (``ssdkit.checkpointing``) and the weights in
transformers' format (``out/model``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from models import mamba2
from ssdkit.data import ByteTokenizer, PackedRows, RowSampler, pack_documents, split_documents
from ssdkit.stack import REMAT_POLICIES
from ssdkit.train import warmup_cosine

MODEL_FLAGS = ("d_model", "n_layer", "d_state", "headdim", "chunk_size", "expand", "ngroups")


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """Everything a training run reads (``ssdkit train`` flags or a TOML/JSON file, same names)."""

    data: str
    out: str = "runs/mamba2"
    tokenizer: str | None = None  # a tokenizer.json (or a directory holding one); None: UTF-8 bytes
    doc_separator: str | None = None  # split a single text file into documents at this string
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
    compute_dtype: str = "float32"
    remat: str = "layer"  # as fast as "none" on CPU and 4x less memory (docs/benchmarks.md)
    held_out: float = 0.05
    eval_every: int = 50
    eval_rows: int = 64
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    progress: bool = True

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> TrainRunConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise ValueError(f"{source}: unknown training option {key!r}")
            clean[name] = value
        if "data" not in clean:
            raise ValueError(f"{source}: the training data (data = PATH) is required")
        return cls(**clean)

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

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "micro_batches", "steps", "eval_every", "eval_rows", "save_every",
                     "keep", *MODEL_FLAGS):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seq_len" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {', '.join(REMAT_POLICIES)}, got {self.remat!r}")
        if not 0 <= self.held_out < 1:
            raise ValueError(f"held_out must be in [0, 1), got {self.held_out}")
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


# ------------------------------------------------------------------------------ data
def _tokenizer(spec: str | None):
    if spec is None:
        return ByteTokenizer(), None
    tok = mamba2.load_tokenizer(spec)
    if tok is None:
        raise ValueError(f"no tokenizer.json in {spec}")
    file = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
    return tok, file


def _encode(tokenizer, text: str) -> tuple[np.ndarray, float]:
    """Token ids of ``text`` and its UTF-8 bytes per token."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text), 1.0
    ids = np.asarray(tokenizer.encode(text).ids, np.int32)
    return ids, len(text.encode("utf-8")) / max(len(ids), 1)


def load_documents(cfg: TrainRunConfig, tokenizer) -> tuple[list[np.ndarray], list[float]]:
    """The corpus as token-id documents and their bytes per token (see the module docstring)."""
    path = Path(cfg.data)
    if path.suffix == ".npy" and path.is_file():
        try:
            ids = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{path} is not a numpy array of token ids: {err}") from None
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{path} must hold a 1-D integer array of token ids, got {ids.dtype} {ids.shape}")
        return [ids.astype(np.int32)], [1.0]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    elif path.is_file():
        text = path.read_text(encoding="utf-8", errors="replace")
        texts = text.split(cfg.doc_separator) if cfg.doc_separator else [text]
    else:
        raise ValueError(f"training data {path} does not exist")
    docs, scales = [], []
    for text in texts:
        if text:
            ids, scale = _encode(tokenizer, text)
            docs.append(ids)
            scales.append(scale)
    if not docs:
        raise ValueError(f"no text in {path}")
    return docs, scales


def prepare_data(cfg: TrainRunConfig, docs, scales) -> tuple[PackedRows, PackedRows | None]:
    """Training rows and held-out rows (None when ``held_out`` is 0)."""
    if len(docs) >= 2:
        train_idx, held_idx = split_documents(len(docs), cfg.held_out, cfg.seed)
        train_docs, held_docs = [docs[i] for i in train_idx], [docs[i] for i in held_idx]
        train_scales, held_scales = [scales[i] for i in train_idx], [scales[i] for i in held_idx]
    else:  # one document (a stream): its last held_out fraction is held out
        cut = len(docs[0]) - int(round(cfg.held_out * len(docs[0])))
        train_docs, held_docs = [docs[0][:cut]], [docs[0][cut:]] if cut < len(docs[0]) else []
        train_scales, held_scales = scales, scales[: len(held_docs)]
    train = pack_documents(train_docs, cfg.seq_len, bytes_per_token=train_scales)
    held = None
    if held_docs and sum(map(len, held_docs)) >= cfg.seq_len:
        held = pack_documents(held_docs, cfg.seq_len, bytes_per_token=held_scales)
    return train, held


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
    if cfg.model is not None:
        mcfg = dataclasses.replace(mamba2.Mamba2Config.preset(cfg.model), vocab_size=vocab_size)
    else:
        mcfg = mamba2.Mamba2Config(vocab_size=vocab_size, **{k: getattr(cfg, k) for k in MODEL_FLAGS})
    params = mamba2.init_params(mcfg, jax.random.key(cfg.seed), stacked=True)
    return params, mcfg


def _check_vocab(rows: PackedRows, mcfg) -> None:
    hi = int(rows.tokens.max())
    if hi >= mcfg.padded_vocab_size:
        raise ValueError(f"token id {hi} in the data is out of range for the model's vocabulary of "
                         f"{mcfg.padded_vocab_size}")


# ------------------------------------------------------------------------------ the loop
def evaluate(params, mcfg, rows: PackedRows, *, batch_size: int, max_rows: int) -> tuple[float, float]:
    """Held-out (loss in nats per token, bits per byte) over up to ``max_rows`` rows."""
    n = min(len(rows), max_rows)
    nll = tokens = nbytes = 0.0
    fn = _eval_fn(mcfg)
    for i in range(0, n, batch_size):
        t, s = rows.tokens[i: i + batch_size], rows.segment_ids[i: i + batch_size]
        _, m = fn(params, jnp.asarray(t), jnp.asarray(s))
        nll += float(m.loss) * float(m.tokens)
        tokens += float(m.tokens)
        _, w = ssdkit.next_token_targets(jnp.asarray(t), segment_ids=jnp.asarray(s))
        nbytes += float(np.sum(np.asarray(w) * rows.token_bytes[i: i + batch_size, 1:]))
    return nll / max(tokens, 1.0), nll / (math.log(2) * max(nbytes, 1.0))


@functools.lru_cache(maxsize=4)
def _eval_fn(mcfg):
    return jax.jit(lambda p, t, s: mamba2.loss(p, mcfg, t, segment_ids=s))


def train(cfg: TrainRunConfig, *, log: Callable[[str], None] = print) -> TrainSummary:
    """Run (or resume) a training run into ``cfg.out``; returns the summary."""
    from ssdkit.checkpointing import TrainCheckpointer

    out = Path(cfg.out)
    tokenizer, tokenizer_file = _tokenizer(cfg.tokenizer)
    vocab = tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else tokenizer.get_vocab_size()
    docs, scales = load_documents(cfg, tokenizer)
    train_rows, held_rows = prepare_data(cfg, docs, scales)
    params, mcfg = _model(cfg, vocab)
    _check_vocab(train_rows, mcfg)
    sampler = RowSampler(len(train_rows), cfg.batch_size, cfg.seed)

    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    optimizer = ssdkit.adamw(cfg.lr, total_steps=cfg.steps, warmup_steps=warmup,
                             min_lr_ratio=cfg.min_lr_ratio, b1=cfg.b1, b2=cfg.b2,
                             weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    schedule = warmup_cosine(cfg.lr, warmup_steps=warmup, total_steps=cfg.steps,
                                          min_ratio=cfg.min_lr_ratio)
    step_fn = make_step(mcfg, optimizer, remat=cfg.remat, micro_batches=cfg.micro_batches,
                        compute_dtype=cfg.compute_dtype)
    state = ssdkit.TrainState.create(params, optimizer)

    checkpointer = TrainCheckpointer(out / "checkpoints", keep=cfg.keep)
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, meta = checkpointer.restore(state)
        if meta.get("seed") != cfg.seed or meta.get("batch_size") != cfg.batch_size:
            raise ValueError(f"{out / 'checkpoints'} was written by a run with another seed or batch size "
                             f"({meta}); use another --out or the same options")
        log(f"[train] resuming from step {resumed_from} in {out / 'checkpoints'}")
    start = int(state.step)

    def export():
        mamba2.save_checkpoint(state.params, mcfg, out / "model")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, out / "model" / "tokenizer.json")

    def save(step: int):
        checkpointer.save(step, state, {"seed": cfg.seed, "batch_size": cfg.batch_size, "data_step": step})
        export()

    progress = _progress(cfg, start)
    if cfg.progress and log is print:  # keep the bar intact
        from tqdm import tqdm

        log = tqdm.write
    t0, tokens_seen, loss = time.perf_counter(), 0, float("nan")
    held_loss = held_bpb = None
    for step in range(start, cfg.steps):
        idx = sampler.indices(step)
        batch = (jnp.asarray(train_rows.tokens[idx]), jnp.asarray(train_rows.segment_ids[idx]))
        state, m = step_fn(state, batch)
        loss, tokens_seen = float(m.loss), tokens_seen + int(batch[0].size)
        rate = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        progress(step + 1, {"loss": f"{loss:.4f}", "lr": f"{float(schedule(step)):.2e}", "tok/s": f"{rate:,.0f}"})
        done = step + 1
        if held_rows is not None and (done % cfg.eval_every == 0 or done == cfg.steps):
            held_loss, held_bpb = evaluate(state.params, mcfg, held_rows, batch_size=cfg.batch_size,
                                           max_rows=cfg.eval_rows)
            log(f"[train] step {done}: held-out loss {held_loss:.4f} nats/token, {held_bpb:.4f} bits/byte")
        if done % cfg.save_every == 0 or done == cfg.steps:
            save(done)
    progress(None, None)
    checkpointer.close()
    if start >= cfg.steps:
        export()
    summary = TrainSummary(steps=cfg.steps, tokens=tokens_seen, seconds=time.perf_counter() - t0, train_loss=loss,
                           held_out_loss=held_loss, held_out_bits_per_byte=held_bpb, skipped=int(state.skipped),
                           resumed_from=resumed_from)
    log(f"[train] done: {summary.steps} steps, {summary.tokens:,} tokens this run in {summary.seconds:.1f} s; "
        f"train loss {loss:.4f}" + ("" if held_loss is None else
                                    f", held-out loss {held_loss:.4f}, {held_bpb:.4f} bits/byte")
        + f"; {summary.skipped} non-finite steps skipped; weights in {out / 'model'}")
    return summary


def make_step(mcfg: mamba2.Mamba2Config, optimizer, *, remat: str = "none", micro_batches: int = 1,
              compute_dtype: str = "float32"):
    """The jitted training step of ``ssdkit train`` (and ``ssdkit bench --train``) on batches
    ``(tokens, segment_ids)``, each (batch, seq) int32: ``ssdkit.make_train_step`` over ``mamba2.loss``."""
    loss_fn = functools.partial(_batch_loss, mcfg=mcfg, remat=remat)
    return ssdkit.make_train_step(loss_fn, optimizer, micro_batches=micro_batches,
                                  compute_dtype=None if compute_dtype == "float32" else jnp.dtype(compute_dtype))


def _batch_loss(params, batch, *, mcfg, remat):
    tokens, segment_ids = batch
    return mamba2.loss(params, mcfg, tokens, segment_ids=segment_ids, remat=remat)


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

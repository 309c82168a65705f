"""``ssdkit eval``: cross-entropy, perplexity and bits per byte of a model over text of any length.

Each file is one document (``ssdkit.models.text.encode_document``: the tokenizer's ids, then
``<|endoftext|>`` when it has one). Documents are laid end to end in ``batch`` rows (each row takes the
next document when it runs short), and every row is read in fixed windows of ``window`` tokens with the
recurrent state and the conv windows carried from one window to the next (``mamba2.score_window``, or
``ssdkit.MixerLM.score_window`` for a mixer model: ``ssdkit.models.archs.family``). For a
recurrence this is exact: no overlap, no truncated context, every target scored once, and the result
does not depend on ``window`` or ``batch`` (tested). Every window has the same shape (the last one padded
with weight 0), so one compiled program serves every window of a row count; rows with nothing to read are
not computed: once every document is taken, the live rows move into the fewest rows of ``batch`` or a power
of two below it (their states taken along), so one file in 8 rows costs one row's forward pass, not eight.
The loop reads nothing back from the device but every 64 windows.

Figures: ``cross_entropy`` = Σ nll / targets (nats per token), ``perplexity`` = exp(cross_entropy),
``bits_per_byte`` = Σ nll / (ln 2 · the files' sizes in bytes). Every token after a document's first is a
target; with the byte tokenizer the first token is ``<|endoftext|>`` (a document boundary), so every byte
and the end of the file are charged: ``bits_per_byte`` is then a code length, comparable with a
compressor's output size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit import MixerLM
from ssdkit.models import archs, corpus, mamba2, text
from ssdkit.models.text import Document


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Totals of an evaluation; the figures are properties."""

    documents: int
    tokens: int  # targets scored
    num_bytes: int  # bytes of the documents (a file's size)
    nll: float  # Σ -ln p(target), nats
    seconds: float

    @property
    def cross_entropy(self) -> float:
        """Nats per target token."""
        return self.nll / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.cross_entropy)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * max(self.num_bytes, 1))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def text_files(spec: str | Path, *, log: Callable[[str], None] | None = None) -> list[Path]:
    """The files to evaluate: a text file, the text files under a folder (``text.text_files_under``: sorted,
    hidden ones and those that are not text skipped; ``log`` gets the counts), or a named corpus part
    (``python-stdlib:held-out``, ``python-packages:held-out``, ``python-code:train``, ...: ``corpus.CORPORA``).
    Nothing to read (a file that is
    not text, a folder without text files, no bytes at all) is a ValueError naming it."""
    named = corpus.resolve(str(spec)) if not Path(spec).exists() else None
    if named is not None:
        named_corpus, part = named
        return named_corpus.paths(part)
    path = Path(spec)
    if path.is_file():
        text.check_text_file(path)
        if path.stat().st_size == 0:
            raise ValueError(f"nothing to evaluate: {path} is empty")
        return [path]
    if not path.is_dir():
        raise ValueError(f"{spec}: no such file or folder, and not a corpus ({', '.join(corpus.CORPORA)})")
    selection = text.text_files_under(path)
    if all(f.stat().st_size == 0 for f in selection.taken):
        raise ValueError(f"nothing to evaluate: the text files under {path} are all empty")
    if log is not None:
        log(selection.summary())
    return selection.taken


def evaluate(params, cfg: mamba2.Mamba2Config | MixerLM, docs: Iterable[Document], *, window: int = 2048,
             batch: int = 1, progress: Callable[[int], None] | None = None) -> EvalResult:
    """Score ``docs`` with a Mamba-2 (``cfg`` its config) or a mixer model (``cfg`` the
    :class:`ssdkit.MixerLM`), see the module docstring; ``progress(targets)`` after each window.

    ``docs`` is consumed lazily: each row takes the next document when its buffer runs short of a window,
    so memory holds about ``batch`` documents (and their windows) at a time, whatever the total. When no
    document is left, rows that run dry leave the batch (``batch`` is the most rows computed at once)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    pending, dry = iter(docs), False
    ids = [np.zeros(0, np.int32) for _ in range(batch)]  # each row's unread stream
    seg = [np.zeros(0, np.int64) for _ in range(batch)]  # its document numbers (global, increasing)
    cache_doc = np.full(batch, -1)  # the document each row's cache continues
    n_docs = n_bytes = scored = 0
    nll_total, nll = 0.0, jnp.zeros((), jnp.float32)
    family = archs.family(cfg)
    sizes = _row_counts(batch)
    cache, axes = None, None
    t0, k = time.perf_counter(), 0
    while True:
        for r in range(len(ids)):  # a window needs window + 1 tokens: the last position's target too
            while len(ids[r]) < window + 1 and not dry:
                doc = next(pending, None)
                if doc is None:
                    dry = True
                elif len(doc.ids):
                    ids[r] = np.concatenate([ids[r], doc.ids.astype(np.int32)])
                    seg[r] = np.concatenate([seg[r], np.full(len(doc.ids), n_docs)])
                    n_docs, n_bytes = n_docs + 1, n_bytes + doc.num_bytes
        if dry:  # a row's last token alone (the window before's last target, or a document of one token) is done
            seg = [b if len(a) > 1 else b[:0] for a, b in zip(ids, seg, strict=True)]
            ids = [a if len(a) > 1 else a[:0] for a in ids]
        live = [r for r in range(len(ids)) if len(ids[r])]
        if not live:
            break
        rows = min(n for n in sizes if n >= len(live))
        if rows < len(ids):  # rows ran dry (no document left to take): the live ones move into fewer rows
            keep = live + [r for r in range(len(ids)) if not len(ids[r])][:rows - len(live)]
            ids, seg, cache_doc = [ids[r] for r in keep], [seg[r] for r in keep], cache_doc[keep]
            if cache is not None:
                axes = _batch_axes(params, cfg) if axes is None else axes
                cache = jax.tree_util.tree_map(functools.partial(_take_rows, np.asarray(keep)), cache, axes)
        if cache is None:
            cache = family.init_cache(params, cfg, rows)
        tokens = np.zeros((rows, window + 1), np.int32)
        docs_w = np.full((rows, window + 1), -1, np.int64)  # -1: past the row's end
        for r in range(rows):
            m = min(len(ids[r]), window + 1)
            tokens[r, :m], docs_w[r, :m] = ids[r][:m], seg[r][:m]
            ids[r], seg[r] = ids[r][window:], seg[r][window:]
        weights = (docs_w[:, 1:] == docs_w[:, :-1]) & (docs_w[:, :-1] >= 0)
        reset = docs_w[:, 0] != cache_doc
        last = np.where(docs_w[:, :window] >= 0, docs_w[:, :window], -1).max(axis=1)
        cache_doc = np.where(last >= 0, last, cache_doc)
        # segment ids within the window: document numbers relative to the row's first (padding: the last)
        local = np.where(docs_w[:, :window] >= 0, docs_w[:, :window], last[:, None]) - docs_w[:, :1]
        sums, cache = family.score_window(params, cfg, jnp.asarray(tokens[:, :window]), jnp.asarray(tokens[:, 1:]),
                                          jnp.asarray(weights, jnp.float32), cache,
                                          segment_ids=jnp.asarray(local.astype(np.int32)), reset=jnp.asarray(reset))
        nll = nll + sums.nll
        scored += int(weights.sum())
        if progress is not None:
            progress(int(weights.sum()))
        k += 1
        if k % 64 == 0:  # a float64 host total: no float32 drift over millions of tokens
            nll_total, nll = nll_total + float(nll), jnp.zeros((), jnp.float32)
    if scored == 0 and n_docs == 0:
        raise ValueError("nothing to evaluate: no tokens")
    if n_bytes == 0:
        raise ValueError("nothing to evaluate: the documents hold no bytes (empty texts)")
    nll_total += float(nll)
    return EvalResult(documents=n_docs, tokens=scored, num_bytes=n_bytes, nll=nll_total,
                      seconds=time.perf_counter() - t0)


def _row_counts(batch: int) -> tuple[int, ...]:
    """The row counts a window is run with: ``batch``, and the powers of two below it (one compiled program
    each, made when rows first run dry)."""
    return (batch, *(1 << i for i in range(batch.bit_length()) if 1 << i < batch))


def _take_rows(rows, a, axis: int):
    """``a``'s batch rows ``rows`` (along ``axis``)."""
    return jnp.take(a, rows, axis=axis)


def _batch_axes(params, cfg):
    """The batch axis of each leaf of the model's cache (the axis whose size follows the rows)."""
    family = archs.family(cfg)
    one, two = (jax.eval_shape(lambda p, n=n: family.init_cache(p, cfg, n), params) for n in (1, 2))

    def axis(a, b):
        (found,) = (i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y)
        return found

    return jax.tree_util.tree_map(axis, one, two)


def read_documents(files: Iterable[Path], tokenizer, *, encoding: str = "utf-8", errors: str = "strict"
                   ) -> Iterator[Document]:
    """Each file as one document, read when the caller asks for it: the byte tokenizer (or its
    tokenizer.json, ``text.byte_level``) gets its bytes, another tokenizer.json its text decoded with
    ``encoding``/``errors`` (strict: an undecodable file is a ValueError naming it and the byte offset).
    ``num_bytes`` is the file's size; an empty file is a document of no bytes (the end-of-document token
    alone, when the tokenizer has one)."""
    text.check_decoding(encoding, errors)
    tokenizer = text.byte_level(tokenizer)  # a byte model's tokenizer.json: read bytes
    for f in files:
        docs = text.read_file_documents(f, tokenizer, encoding=encoding, errors=errors)
        yield docs[0] if docs else text.encode_document(tokenizer, "")

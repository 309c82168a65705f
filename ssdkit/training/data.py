"""Training data for language models: documents packed into fixed-length rows, split and shuffled
deterministically.

A corpus is a list of documents, each a 1-D array of token ids. :func:`pack_documents` concatenates
them into rows of ``seq_len`` tokens with ``segment_ids`` numbering the documents inside each row (a
document longer than the room left continues in the next row under a new id), so a model that resets
its state at each change of id (``ssd_scan``, ``causal_conv1d``) sees every document from its start.
:class:`RowSampler` draws batches of rows: a fresh permutation per epoch from ``(seed, epoch)``, so the
batch of any step is a pure function of the step — a resumed run reads exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``<|endoftext|>`` = 256 marking document boundaries.

    ``encode`` gives ``[256, *bytes]`` (the boundary before a document, so its first byte is predicted
    too) and a training document is ``encode(text) + [256]`` (so the model learns where files end):
    the same ids as the ``tokenizer.json`` that :meth:`tokenizers_json` describes, which is what a
    trained byte model ships with. No vocabulary file, nothing unknown, 1 token = 1 byte.
    """

    vocab_size = 257
    eod_id = 256
    eod_token = "<|endoftext|>"

    def encode(self, text: str | bytes) -> np.ndarray:
        """``[256, *bytes]``: a str's UTF-8 bytes, or the given bytes as they are (a file's, undecoded)."""
        raw = bytes(text) if isinstance(text, bytes | bytearray | memoryview) else text.encode("utf-8")
        data = np.frombuffer(raw, np.uint8).astype(np.int32)
        return np.concatenate([np.array([self.eod_id], np.int32), data])

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        return bytes(ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    @classmethod
    def tokenizers_json(cls) -> dict:
        """This tokenizer as a Hugging Face ``tokenizers`` description (``tokenizer.json``): a byte-level
        BPE without merges (GPT-2's byte-to-character map), ``<|endoftext|>`` as id 256, added in front
        of every encoded text by the post-processor."""
        chars = _gpt2_byte_chars()
        eod = {"id": cls.eod_token, "type_id": 0}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": cls.eod_id, "content": cls.eod_token, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False},
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": eod}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": eod}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": eod}, {"Sequence": {"id": "B", "type_id": 0}}],
                "special_tokens": {cls.eod_token: {"id": cls.eod_token, "ids": [cls.eod_id],
                                                   "tokens": [cls.eod_token]}},
            },
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": {c: i for i, c in enumerate(chars)}, "merges": []},
        }


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's printable character for each byte 0..255 (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """``tokens`` and ``segment_ids``: (rows, seq_len) int32 each; ``token_bytes`` (rows, seq_len) float32
    the UTF-8 bytes each token stands for (bits per byte: 1 everywhere for the byte tokenizer)."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    token_bytes: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def pack_documents(
    docs: Sequence[np.ndarray], seq_len: int, *, bytes_per_token: Sequence[float] | None = None
) -> PackedRows:
    """Concatenate ``docs`` into rows of ``seq_len`` tokens; a trailing partial row is dropped.

    ``segment_ids`` count 0, 1, ... within each row: a change of id marks a document start (or the
    continuation of a split document, which then starts afresh: its first token in the new row is not a
    target). ``bytes_per_token[i]`` (default 1) is document i's UTF-8 bytes per token.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    docs = [np.asarray(d) for d in docs if len(d)]
    for i, d in enumerate(docs):
        if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
            raise ValueError(f"document {i} must be a 1-D integer array, got {d.dtype} {d.shape}")
    if not docs:
        raise ValueError("no non-empty documents to pack")
    lengths = np.array([len(d) for d in docs])
    flat = np.concatenate(docs).astype(np.int32)
    doc_of = np.repeat(np.arange(len(docs)), lengths)
    rows = len(flat) // seq_len
    if rows == 0:
        raise ValueError(f"the documents hold {len(flat)} tokens, fewer than one row of seq_len={seq_len}")
    flat, doc_of = flat[: rows * seq_len].reshape(rows, seq_len), doc_of[: rows * seq_len].reshape(rows, seq_len)
    starts = np.concatenate([np.ones((rows, 1), bool), doc_of[:, 1:] != doc_of[:, :-1]], axis=1)
    segment_ids = (np.cumsum(starts, axis=1) - 1).astype(np.int32)
    scale = np.ones(len(docs)) if bytes_per_token is None else np.asarray(bytes_per_token, np.float64)
    if scale.shape != (len(docs),):
        raise ValueError(f"bytes_per_token must give one number per non-empty document ({len(docs)})")
    return PackedRows(tokens=flat, segment_ids=segment_ids, token_bytes=scale[doc_of].astype(np.float32))


def split_documents(n_docs: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and held-out documents: a ``held_out`` fraction (at least one document
    when ``held_out > 0`` and there are two or more), chosen by a permutation from ``seed``."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held_out must be in [0, 1), got {held_out}")
    perm = np.random.default_rng([seed, 1]).permutation(n_docs)
    n_held = 0 if held_out == 0 or n_docs < 2 else max(1, int(round(held_out * n_docs)))
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


@dataclasses.dataclass(frozen=True)
class RowSampler:
    """Batches of ``batch_size`` rows; step ``s`` reads positions ``s·batch .. (s+1)·batch`` of the
    concatenated per-epoch permutations (seeded by ``(seed, epoch)``), so a batch depends only on ``s``."""

    num_rows: int
    batch_size: int
    seed: int

    def __post_init__(self):
        if self.batch_size < 1 or self.num_rows < self.batch_size:
            raise ValueError(f"need 1 <= batch_size <= rows, got batch_size={self.batch_size} with "
                             f"{self.num_rows} rows")

    def indices(self, step: int) -> np.ndarray:
        start = step * self.batch_size
        out = []
        while len(out) < self.batch_size:
            epoch, offset = divmod(start + len(out), self.num_rows)
            perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_rows)
            out.extend(perm[offset: offset + self.batch_size - len(out)].tolist())
        return np.asarray(out)

    def epoch(self, step: int) -> float:
        return step * self.batch_size / self.num_rows

"""Text ↔ token ids for training, evaluation and generation, for either kind of tokenizer ssdkit uses:
``ssdkit.training.data.ByteTokenizer`` (UTF-8 bytes + ``<|endoftext|>``) or a Hugging Face ``tokenizers.Tokenizer``
(a checkpoint's ``tokenizer.json``).

A *document* (one file) is ``encode(text)`` followed by the end-of-document token when the tokenizer
has one (``<|endoftext|>``): training and ``ssdkit eval`` read the same ids, so a model learns where files
end and evaluation charges it for predicting that.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ssdkit.training.data import ByteTokenizer

EOD_TOKEN = ByteTokenizer.eod_token


def load(spec: str | Path | None):
    """``(tokenizer, tokenizer.json path or None)``: None gives the byte tokenizer; else a
    ``tokenizer.json`` file or a directory holding one."""
    from ssdkit.models import mamba2

    if spec is None:
        return ByteTokenizer(), None
    tok = mamba2.load_tokenizer(spec)
    if tok is None:
        raise ValueError(f"no tokenizer.json in {spec}")
    file = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
    return tok, file


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted by path, leaving out hidden files and folders (``.git``, ...):
    the documents of a folder, for training and for evaluation alike."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def vocab_size(tokenizer) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else tokenizer.get_vocab_size()


def eod_id(tokenizer) -> int | None:
    """The end-of-document id (``<|endoftext|>``), or None when the tokenizer has none."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.eod_id
    return tokenizer.token_to_id(EOD_TOKEN)


def encode(tokenizer, text: str) -> np.ndarray:
    """``text``'s ids as the tokenizer gives them (its post-processor's specials included), int32."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return np.asarray(tokenizer.encode(text).ids, np.int32)


@dataclasses.dataclass(frozen=True)
class Document:
    """A document's ``ids`` (int32) and the UTF-8 bytes of its text."""

    ids: np.ndarray
    num_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(len(self.ids), 1)


def encode_document(tokenizer, text: str) -> Document:
    """``encode(text)`` + the end-of-document id (when the tokenizer has one)."""
    ids = encode(tokenizer, text)
    end = eod_id(tokenizer)
    if end is not None:
        ids = np.concatenate([ids, np.array([end], np.int32)])
    return Document(ids, len(text.encode("utf-8")))


class StreamDecoder:
    """Text of a growing token sequence, piece by piece: ``push(id)`` returns the new text, holding back
    an incomplete UTF-8 character (a byte token, or a byte-level BPE token that splits a character) until
    its last byte arrives. Special tokens decode to nothing."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._shown = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids)  # both kinds skip special tokens
        if text.endswith("\ufffd"):
            return ""
        new, self._shown = text[self._shown:], len(text)
        if new.endswith("\n"):  # start afresh: decoding stays O(line) per token
            self._ids, self._shown = [], 0
        return new

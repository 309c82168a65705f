"""Text ↔ token ids for training, evaluation and generation, for either kind of tokenizer ssdkit uses:
``ssdkit.training.data.ByteTokenizer`` (UTF-8 bytes + ``<|endoftext|>``) or a Hugging Face ``tokenizers.Tokenizer``
(a checkpoint's ``tokenizer.json``).

A *document* (one file) is ``encode(text)`` followed by the end-of-document token when the tokenizer
has one (``<|endoftext|>``): training and ``ssdkit eval`` read the same ids, so a model learns where files
end and evaluation charges it for predicting that.

Files are read here, for training and evaluation alike (:func:`read_file_documents`): the byte tokenizer
gets the file's bytes, every one of them and nothing else; a ``tokenizer.json`` gets the text decoded with
the user's ``encoding`` and ``errors`` (by default strict UTF-8: an undecodable file is refused, naming it
and the byte offset). A document's ``num_bytes`` is always the size of the bytes it came from. A folder's
documents are its text files (:func:`text_files_under`): a file whose first 8 KiB hold a NUL byte (git's
rule: ``.pyc``, images, archives) is skipped.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ssdkit.training.data import ByteTokenizer

EOD_TOKEN = ByteTokenizer.eod_token


def load(spec: str | Path | None):
    """``(tokenizer, tokenizer.json path or None)``: None gives the byte tokenizer; else a
    ``tokenizer.json`` file or a directory holding one (the byte tokenizer's own gives the byte tokenizer:
    :func:`byte_level`)."""
    from ssdkit.models import mamba2

    if spec is None:
        return ByteTokenizer(), None
    tok = mamba2.load_tokenizer(spec)
    if tok is None:
        raise ValueError(f"no tokenizer.json in {spec}")
    file = Path(spec) / "tokenizer.json" if Path(spec).is_dir() else Path(spec)
    return byte_level(tok), file


@functools.cache
def _byte_tokenizer_description() -> dict:
    from tokenizers import Tokenizer

    return json.loads(Tokenizer.from_str(json.dumps(ByteTokenizer.tokenizers_json())).to_str())


def byte_level(tokenizer):
    """``ByteTokenizer()`` when ``tokenizer`` is the ``tokenizers.Tokenizer`` describing it (the
    ``tokenizer.json`` a byte model ships with: the same ids), so that files are read as bytes, not text;
    else ``tokenizer`` itself."""
    if isinstance(tokenizer, ByteTokenizer) or not hasattr(tokenizer, "to_str"):
        return tokenizer
    return ByteTokenizer() if json.loads(tokenizer.to_str()) == _byte_tokenizer_description() else tokenizer


def files_under(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted by path, leaving out hidden files and folders (``.git``, ...)."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


SNIFF_BYTES = 8192  # a file is text when these first bytes hold no NUL (git's heuristic)


def binary_offset(path: Path) -> int | None:
    """The offset of the first NUL byte in ``path``'s first :data:`SNIFF_BYTES` bytes (the file is then
    not text), or None (a text file; an empty file is text). Unreadable: ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    at = head.find(b"\0")
    return None if at < 0 else at


@dataclasses.dataclass(frozen=True)
class FileSelection:
    """A folder's documents: the text files ``taken`` and the ``skipped`` ones (not text), both sorted."""

    folder: Path
    taken: list[Path]
    skipped: list[Path]

    def summary(self) -> str:
        line = f"{self.folder}: {len(self.taken)} text files taken, {len(self.skipped)} skipped"
        if self.skipped:
            shown = ", ".join(str(p.relative_to(self.folder)) for p in self.skipped[:3])
            more = f", ... ({len(self.skipped)} in all)" if len(self.skipped) > 3 else ""
            line += f" (not text: a NUL byte in the first 8 KiB; {shown}{more})"
        return line


def text_files_under(folder: Path) -> FileSelection:
    """The documents of a folder, for training and for evaluation alike: every file of
    :func:`files_under` that is text (:func:`binary_offset`), and the ones skipped. A folder without a
    text file is a ValueError naming it."""
    folder = Path(folder)
    taken, skipped = [], []
    for p in files_under(folder):
        (taken if binary_offset(p) is None else skipped).append(p)
    if not taken:
        raise ValueError(f"no text files under {folder}" + (f" ({len(skipped)} files skipped: not text, a NUL "
                                                            "byte in their first 8 KiB)" if skipped else ""))
    return FileSelection(folder, taken, skipped)


def check_text_file(path: Path) -> None:
    """A file named on its own must be text: ValueError (naming it and the NUL byte's offset) if not."""
    at = binary_offset(path)
    if at is not None:
        raise ValueError(f"{path} is not a text file (a NUL byte at offset {at}); give a text file, a folder "
                         "(files that are not text are skipped) or a .npy of token ids")


_TEXT_ERRORS = ("strict", "replace", "ignore", "backslashreplace")


def check_decoding(encoding: str, errors: str) -> None:
    """``encoding`` and ``errors`` as files are decoded for a ``tokenizer.json`` (``bytes.decode``): a text
    codec Python knows, and an error handler that gives text. ValueError naming the bad one otherwise."""
    if not isinstance(encoding, str):
        raise ValueError(f"encoding must be a codec name such as utf-8, latin-1 or cp1252, got {encoding!r}")
    try:
        codecs.lookup(encoding)
        b"a".decode(encoding, "replace")
    except LookupError:
        raise ValueError(f"encoding must be a text codec Python knows (utf-8, latin-1, cp1252, utf-16, ...), "
                         f"got {encoding!r}") from None
    ok = isinstance(errors, str)
    if ok:
        try:
            codecs.lookup_error(errors)
            ok = errors in _TEXT_ERRORS
        except LookupError:
            ok = False
    if not ok:
        raise ValueError(f"errors must be one of {', '.join(_TEXT_ERRORS)} (what undecodable bytes do: strict "
                         f"refuses the file), got {errors!r}")


def vocab_size(tokenizer) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else tokenizer.get_vocab_size()


def eod_id(tokenizer) -> int | None:
    """The end-of-document id (``<|endoftext|>``), or None when the tokenizer has none."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.eod_id
    return tokenizer.token_to_id(EOD_TOKEN)


def encode(tokenizer, text: str | bytes) -> np.ndarray:
    """``text``'s ids as the tokenizer gives them (its post-processor's specials included), int32. Bytes
    are for the byte tokenizer only (its ids are the bytes themselves)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    if isinstance(text, bytes | bytearray):
        raise TypeError("a tokenizer.json encodes text: decode the bytes first (read_file_documents does)")
    return np.asarray(tokenizer.encode(text).ids, np.int32)


@dataclasses.dataclass(frozen=True)
class Document:
    """A document's ``ids`` (int32) and the size in bytes of what it was read from (the UTF-8 bytes of a
    text given as ``str``)."""

    ids: np.ndarray
    num_bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.num_bytes / max(len(self.ids), 1)


def encode_document(tokenizer, text: str | bytes, num_bytes: int | None = None) -> Document:
    """``encode(text)`` + the end-of-document id (when the tokenizer has one); ``num_bytes`` defaults to
    the size of ``text`` (bytes) or of its UTF-8 encoding (str)."""
    ids = encode(tokenizer, text)
    end = eod_id(tokenizer)
    if end is not None:
        ids = np.concatenate([ids, np.array([end], np.int32)])
    if num_bytes is None:
        num_bytes = len(text) if isinstance(text, bytes | bytearray) else len(text.encode("utf-8"))
    return Document(ids, num_bytes)


def read_file_documents(path: Path, tokenizer, *, encoding: str = "utf-8", errors: str = "strict",
                        separator: str | None = None) -> list[Document]:
    """The documents of the file ``path`` (one, or its pieces between ``separator``s; empty pieces are
    left out, so an empty file gives none).

    The byte tokenizer encodes the file's bytes as they are (``separator`` is matched as UTF-8); a
    ``tokenizer.json`` the text decoded with ``encoding`` and ``errors`` (``separator`` is matched in the
    text). Each document's ``num_bytes`` is the size of its bytes in the file (decoded pieces: re-encoded,
    scaled to the file's size less the separators'). An undecodable file under
    ``errors="strict"`` is a ValueError naming it, the byte offset and the flags that choose otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror or err}") from None
    if isinstance(tokenizer, ByteTokenizer):
        pieces = data.split(separator.encode("utf-8")) if separator else [data]
        return [encode_document(tokenizer, piece) for piece in pieces if piece]
    try:
        whole = data.decode(encoding, errors)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: byte {err.start} (0x{data[err.start]:02x}) is not valid {encoding} "
                         f"({err.reason}); name the file's encoding with --encoding (e.g. latin-1, cp1252), "
                         f"or decode anyway with --errors replace") from None
    if not separator:
        return [encode_document(tokenizer, whole, len(data))] if whole else []
    # the file's size less the separators', shared out by the pieces' sizes re-encoded: exact when the text
    # re-encodes to the file's bytes (strict decoding of a codec without a byte-order mark)
    pieces = whole.split(separator)
    sizes = np.array([len(p.encode(encoding, "replace")) for p in pieces])
    room = max(len(data) - len(separator.encode(encoding, "replace")) * (len(pieces) - 1), 0)
    ends = np.round(np.cumsum(sizes) * (room / max(sizes.sum(), 1))).astype(int)  # rounded, summing to room
    sizes = np.diff(ends, prepend=0)
    return [encode_document(tokenizer, p, int(n)) for p, n in zip(pieces, sizes, strict=True) if p]


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


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` ids learnt from ``texts`` (the training
    split: never the held-out text).

    Laid out as the byte tokenizer is, so the two agree wherever they can: ids 0..255 are the bytes
    (GPT-2's byte-to-character map), 256 is ``<|endoftext|>`` (added in front of every encoded text by the
    post-processor, so a document's first token is predicted too), and the merges follow from 257 in the
    order they were learnt. Pre-tokenization is GPT-2's (words, numbers, punctuation and whitespace runs
    apart), so a merge never crosses from indentation into code. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not ByteTokenizer.vocab_size < vocab_size <= 2**16:
        raise ValueError(f"a BPE vocabulary must have {ByteTokenizer.vocab_size + 1}..65536 ids, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    learnt = json.loads(tok.to_str())
    # Re-number: bytes first (as the byte tokenizer), <|endoftext|> at 256, then the merges' tokens in order.
    byte_level_json = ByteTokenizer.tokenizers_json()
    chars = byte_level_json["model"]["vocab"]  # GPT-2 character of byte b -> b
    old = sorted(learnt["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {**chars, EOD_TOKEN: ByteTokenizer.eod_id}
    for token, _ in old:
        if token not in vocab:
            vocab[token] = len(vocab)
    description = dict(byte_level_json)
    description["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                                    "use_regex": True}
    description["model"] = {**byte_level_json["model"], "vocab": vocab, "merges": learnt["model"]["merges"]}
    return Tokenizer.from_str(json.dumps(description))

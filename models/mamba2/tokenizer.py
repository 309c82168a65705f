"""Tokenizer loading: ``tokenizer.json`` (Hugging Face ``tokenizers``) from a checkpoint directory, or a
Hub id resolved with ``huggingface_hub`` when it is installed and the network allows it."""

from __future__ import annotations

from pathlib import Path

#: encoded once by every load: a tokenizer.json that parses but cannot encode is rejected up front
_PROBE_TEXT = "Hello, world! 123"


def load_tokenizer(path_or_hub_id: str | Path):
    """A ``tokenizers.Tokenizer`` from ``<dir>/tokenizer.json`` (or a ``tokenizer.json`` file itself).

    Returns None when a local directory has no ``tokenizer.json`` (the caller decides what to do); raises
    ``ValueError`` naming the file when it is not a valid tokenizer (one that fails to encode a short
    text included). An argument that is not a local path is taken as a Hub id (e.g.
    ``"state-spaces/mamba2-130m"``) and fetched with ``huggingface_hub`` if installed; ``ValueError`` when
    that is impossible (offline, unknown repo, no huggingface_hub). The published Mamba-2 checkpoints use
    EleutherAI's gpt-neox-20b tokenizer (``<|endoftext|>`` = 0).
    """
    path = Path(path_or_hub_id)
    if path.is_dir() or path.is_file():
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            return None
        return _from_file(file)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"{path_or_hub_id} is not a local directory, and huggingface_hub is not installed "
                         f"to fetch it as a Hub id") from None
    try:
        file = hf_hub_download(str(path_or_hub_id), "tokenizer.json")
    except Exception as err:  # offline, unknown repo, invalid id, ...
        raise ValueError(f"{path_or_hub_id!r} is not a local directory and its tokenizer.json could not be "
                         f"fetched from the Hugging Face Hub (offline?): {type(err).__name__}: {err}") from None
    return _from_file(Path(file))


def _from_file(file: Path):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(file))
        tok.encode(_PROBE_TEXT)
    except BaseException as err:  # noqa: BLE001 - see below
        # tokenizers raises a generic Exception, and pyo3's PanicException (a BaseException) where its
        # Rust code panics on a malformed file; anything else (KeyboardInterrupt, ...) passes through.
        if not isinstance(err, Exception) and type(err).__name__ != "PanicException":
            raise
        raise ValueError(f"{file} is not a valid tokenizer.json: {err}") from None
    return tok

"""Tokenizer loading: ``tokenizer.json`` (Hugging Face ``tokenizers``) from a checkpoint directory, or a
Hub id resolved with ``huggingface_hub`` when it is installed and the network allows it."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path_or_hub_id: str | Path):
    """A ``tokenizers.Tokenizer`` from ``<dir>/tokenizer.json`` (or a ``tokenizer.json`` file itself).

    Returns None when a local directory has no ``tokenizer.json`` (the caller decides what to do). An
    argument that is not a local path is taken as a Hub id (e.g. ``"state-spaces/mamba2-130m"``) and
    fetched with ``huggingface_hub`` if installed; ``ValueError`` when that is impossible (offline,
    unknown repo, no huggingface_hub). The published Mamba-2 checkpoints use EleutherAI's gpt-neox-20b
    tokenizer (``<|endoftext|>`` = 0).
    """
    from tokenizers import Tokenizer

    path = Path(path_or_hub_id)
    if path.is_dir() or path.is_file():
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            return None
        try:
            return Tokenizer.from_file(str(file))
        except Exception as err:  # the library raises a generic Exception
            raise ValueError(f"{file} is not a valid tokenizer.json: {err}") from None
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
    return Tokenizer.from_file(file)

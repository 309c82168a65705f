"""Tokenizer loading: ``tokenizer.json`` (Hugging Face ``tokenizers``) from a checkpoint directory, or a
Hub id resolved with ``huggingface_hub`` when it is installed and the network allows it."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path_or_hub_id: str | Path):
    """A ``tokenizers.Tokenizer``, or None when a local directory has no ``tokenizer.json``.

    The published Mamba-2 checkpoints use EleutherAI's gpt-neox-20b tokenizer (``<|endoftext|>`` = 0).
    """
    from tokenizers import Tokenizer

    path = Path(path_or_hub_id)
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.exists():
            return None
        try:
            return Tokenizer.from_file(str(file))
        except Exception as err:  # noqa: BLE001 - the library raises a generic Exception
            raise ValueError(f"{file} is not a valid tokenizer.json: {err}") from None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ValueError(f"{path_or_hub_id} is not a directory, and huggingface_hub is not installed "
                         f"to resolve it as a Hub id") from None
    try:
        return Tokenizer.from_file(hf_hub_download(str(path_or_hub_id), "tokenizer.json"))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...
        raise ValueError(f"could not fetch tokenizer.json for {path_or_hub_id!r}: {err}") from None

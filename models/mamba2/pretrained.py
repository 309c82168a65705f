"""The Mamba-2 that ships inside the package: a byte-level model trained with ``ssdkit train`` on the
Python standard library's sources (``models/pretrained/<name>/``: config.json, model.safetensors,
tokenizer.json, training.json with the run's options, the corpus manifest and its held-out figures).

``load_pretrained()`` returns it from Python; ``ssdkit generate`` and ``ssdkit eval`` use it when no
``--model`` is given (or ``--model default``).
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any

from models.mamba2.checkpoint import load_checkpoint
from models.mamba2.config import Mamba2Config
from models.mamba2.params import Mamba2Params
from models.mamba2.tokenizer import load_tokenizer

#: the name of the shipped model (a folder of ``models/pretrained``)
DEFAULT = "mamba2-stdlib-bytes"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A loaded shipped model: weights, config, its tokenizer (``tokenizers.Tokenizer``), the folder it
    came from and ``training`` (training.json: how it was made and what it measured)."""

    params: Mamba2Params
    cfg: Mamba2Config
    tokenizer: Any
    path: Path
    training: dict


def pretrained_path(name: str = DEFAULT) -> Path:
    """The folder of a shipped model (inside the installed package)."""
    folder = resources.files("models") / "pretrained" / name
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        shipped = sorted(p.name for p in Path(str(resources.files("models") / "pretrained")).glob("*")
                         if (p / "config.json").is_file())
        raise ValueError(f"no shipped model {name!r} (shipped: {', '.join(shipped) or 'none'})")
    return path


def load_pretrained(name: str = DEFAULT, *, dtype=None, stacked: bool = False) -> Pretrained:
    """Load a shipped model (default: the byte-level stdlib model); ``dtype``/``stacked`` as in
    :func:`models.mamba2.load_checkpoint`."""
    path = pretrained_path(name)
    params, cfg = load_checkpoint(path, dtype=dtype, stacked=stacked)
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    return Pretrained(params, cfg, load_tokenizer(path), path, training)

"""The Mamba-2 that ships inside the package: a small model trained with ``ssdkit train`` on Python
sources, the standard library's and the installed packages', with a byte-level BPE learnt from them
(``models/pretrained/<name>/``: config.json, model.safetensors, tokenizer.json, generation_config.json with
its sampling defaults, training.json with the run's options and the corpus manifest, evaluation.json with
its held-out figures, and its model card).

``load_pretrained()`` returns it from Python; ``ssdkit generate``, ``ssdkit eval`` and ``ssdkit serve`` use
it when no ``--model`` is given (or ``--model default``).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import json
import shutil
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from ssdkit.models.mamba2.checkpoint import load_checkpoint
from ssdkit.models.mamba2.config import Mamba2Config
from ssdkit.models.mamba2.params import Mamba2Params
from ssdkit.models.mamba2.tokenizer import load_tokenizer

#: the name of the shipped model (a folder of ``models/pretrained``)
DEFAULT = "mamba2-python-bpe"


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
    """The folder of a shipped model: inside the installed package, where the package is files on disk
    (the usual install); where it is not (imported from a zip archive), a copy of the folder in a temporary
    directory, made on the first call and removed when the process exits."""
    root = resources.files("ssdkit.models") / "pretrained"
    folder = root / name
    if not folder.joinpath("config.json").is_file():
        shipped = sorted(p.name for p in root.iterdir() if p.joinpath("config.json").is_file()) if root.is_dir() else []
        raise ValueError(f"no shipped model {name!r} (shipped: {', '.join(shipped) or 'none'})")
    if isinstance(folder, Path):  # on disk: the real folder (what importlib.resources.as_file gives for it)
        return folder
    # importlib.resources.as_file takes folders only from Python 3.12 on, and would remove the copy when
    # its context closes, while callers keep the path (the command line passes it on as --model).
    return _extracted(name)


@functools.cache  # one copy per process: a folder of the package's read-only data, not a cache of results
def _extracted(name: str) -> Path:
    """A copy of shipped model ``name``'s folder, for a package not on disk; removed at exit."""
    tmp = Path(tempfile.mkdtemp(prefix="ssdkit-pretrained-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    _copy_tree(resources.files("ssdkit.models") / "pretrained" / name, tmp / name)
    return tmp / name


def _copy_tree(src: Traversable, dest: Path) -> None:
    dest.mkdir()
    for entry in src.iterdir():
        if entry.is_dir():
            _copy_tree(entry, dest / entry.name)
        elif entry.is_file():
            with entry.open("rb") as fin, open(dest / entry.name, "wb") as fout:
                shutil.copyfileobj(fin, fout)


def load_pretrained(name: str = DEFAULT, *, dtype=None, stacked: bool = False) -> Pretrained:
    """Load a shipped model (default: :data:`DEFAULT`); ``dtype``/``stacked`` as in
    :func:`ssdkit.models.mamba2.load_checkpoint`."""
    path = pretrained_path(name)
    params, cfg = load_checkpoint(path, dtype=dtype, stacked=stacked)
    training = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    return Pretrained(params, cfg, load_tokenizer(path), path, training)

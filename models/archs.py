"""Architectures by name for the command line: the mixers shipped in ``ssdkit.models``, or a user's own.

``--arch NAME`` takes one of :data:`MIXERS`' names, or ``package.module:Class`` for a mixer class that
meets :class:`ssdkit.Mixer` (importable from the current directory or the installed packages; built with
no arguments). Every one trains, generates and evaluates as an :class:`ssdkit.MixerLM` of the shape
flags (:func:`lm_config`); its checkpoint folder is ``model.safetensors`` (one tensor per parameter path)
and ``mixer.json`` (the architecture, the mixer's settings and the shapes), read by :func:`load_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ssdkit import LMConfig, MixerLM
from ssdkit.core.mixer import check_mixer
from ssdkit.models.delta import KDA, RWKV7, DeltaNet, GatedDeltaNet
from ssdkit.models.toy import GLA, Retention

#: The shipped mixers by ``--arch`` name (Mamba-2 is its own family: ``ssdkit.models.mamba2``).
MIXERS: dict[str, Callable[[], Any]] = {"retention": Retention, "gla": GLA, "deltanet": DeltaNet,
                                         "gated-deltanet": GatedDeltaNet, "kda": KDA, "rwkv7": RWKV7}
CHECKPOINT_CONFIG = "mixer.json"
CHECKPOINT_WEIGHTS = "model.safetensors"


def is_custom(arch: str) -> bool:
    """Whether ``arch`` names a user's class (``package.module:Class``) rather than a shipped mixer."""
    return ":" in arch


def check_arch(arch: str) -> None:
    """Raise ValueError unless ``arch`` is ``mamba2``, a name of :data:`MIXERS`, or ``module:Class`` in form."""
    if arch == "mamba2" or arch in MIXERS:
        return
    if is_custom(arch):
        module, _, name = arch.partition(":")
        if module and name and all(p.isidentifier() for p in module.split(".")) and name.isidentifier():
            return
        raise ValueError(f"arch {arch!r}: a custom mixer is given as package.module:Class")
    raise ValueError(f"arch must be mamba2, one of {', '.join(MIXERS)}, or package.module:Class for your own "
                     f"mixer, got {arch!r}")


def mixer(arch: str) -> Any:
    """The mixer that ``arch`` names (shipped, or ``package.module:Class`` imported and built with no
    arguments), checked against :class:`ssdkit.Mixer`."""
    check_arch(arch)
    if not is_custom(arch):
        return MIXERS[arch]()
    module_name, _, class_name = arch.partition(":")
    if "" not in sys.path and "." not in sys.path:  # `python -m`'s rule: the current directory imports
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"arch {arch!r}: cannot import {module_name}: {err}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ValueError(f"arch {arch!r}: {module_name} has no {class_name}")
    try:
        instance = cls()
    except TypeError as err:
        raise ValueError(f"arch {arch!r}: {class_name}() must build with no arguments (a frozen dataclass whose "
                         f"fields have defaults): {err}") from None
    try:
        check_mixer(instance)
    except TypeError as err:
        raise ValueError(f"arch {arch!r}: {err}") from None
    return instance


def lm_config(*, vocab_size: int, d_model: int, n_layer: int, d_state: int, headdim: int, chunk_size: int,
              expand: int, ngroups: int, d_conv: int) -> LMConfig:
    """The shape flags (Mamba-2's names) as an :class:`ssdkit.LMConfig`: heads of ``headdim`` channels over
    ``expand·d_model``, ``d_state`` per head, ``ngroups`` groups, convs of ``d_conv`` taps."""
    if expand * d_model % headdim:
        raise ValueError(f"expand·d_model = {expand * d_model} must be a multiple of headdim={headdim}")
    heads = expand * d_model // headdim
    if heads % ngroups:
        raise ValueError(f"ngroups={ngroups} must divide the {heads} heads (expand·d_model / headdim)")
    return LMConfig(vocab_size=vocab_size, d_model=d_model, n_layer=n_layer, num_heads=heads, head_dim=headdim,
                    state_dim=d_state, num_groups=ngroups, chunk_size=chunk_size, conv_kernel=d_conv)


def _arch_name(model: MixerLM) -> str:
    cls = type(model.mixer)
    for name, factory in MIXERS.items():
        if factory is cls:
            return name
    return f"{cls.__module__}:{cls.__qualname__}"


def _settings(mixer_: Any) -> dict:
    return dataclasses.asdict(mixer_) if dataclasses.is_dataclass(mixer_) else {}


def save_checkpoint(params, model: MixerLM, folder: str | Path) -> None:
    """``folder/model.safetensors`` (one tensor per parameter path, float32 as trained) and ``mixer.json``."""
    from ssdkit.tensor_files import save_safetensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = {jax.tree_util.keystr(path).lstrip("."): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    save_safetensors(flat, folder / CHECKPOINT_WEIGHTS)
    record = {"arch": _arch_name(model), "mixer": _settings(model.mixer), "config": dataclasses.asdict(model.cfg)}
    (folder / CHECKPOINT_CONFIG).write_text(json.dumps(record, indent=2) + "\n")


def load_checkpoint(folder: str | Path, dtype=None):
    """``(params, model)`` from a folder :func:`save_checkpoint` wrote (a :class:`~ssdkit.tensor_files.CheckpointError`
    otherwise): missing, extra, mis-shaped or non-finite tensors are refused by name; the mixer is rebuilt
    from its architecture and settings, the model from its shapes."""
    from ssdkit.tensor_files import CheckpointError, SafetensorsReader, name_list, parse_json_file

    folder = Path(folder)
    config_file, weights = folder / CHECKPOINT_CONFIG, folder / CHECKPOINT_WEIGHTS
    try:
        record = parse_json_file(config_file)
        arch, settings, config = record["arch"], record["mixer"], record["config"]
        model = MixerLM(LMConfig(**config), type(mixer(arch))(**settings))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config_file}: not a mixer checkpoint's config ({type(err).__name__}: {err})") from None
    if not weights.is_file():
        raise CheckpointError(f"{folder} has {CHECKPOINT_CONFIG} but no {CHECKPOINT_WEIGHTS}")
    abstract = jax.eval_shape(model.init, jax.random.key(0))
    paths = jax.tree_util.tree_leaves_with_path(abstract)
    names = [jax.tree_util.keystr(p).lstrip(".") for p, _ in paths]
    reader = SafetensorsReader([weights])
    try:
        missing = [n for n in names if n not in reader.names()]
        extra = sorted(reader.names() - set(names))
        if missing or extra:
            raise CheckpointError(f"{weights}: " + "; ".join(
                ([f"missing tensors {name_list(missing)}"] if missing else []) +
                ([f"unexpected tensors {name_list(extra)}"] if extra else [])))
        leaves = []
        for name, (_, leaf) in zip(names, paths, strict=True):
            if reader.shape(name) != tuple(leaf.shape):
                raise CheckpointError(f"{weights}: tensor {name} has shape {reader.shape(name)}, the config "
                                      f"needs {tuple(leaf.shape)}")
            array = reader.read(name)
            if not jax.numpy.issubdtype(array.dtype, jax.numpy.floating) or not np.all(np.isfinite(array)):
                raise CheckpointError(f"{weights}: tensor {name} must hold finite floats ({array.dtype})")
            leaves.append(jax.numpy.asarray(array, dtype or leaf.dtype))
    finally:
        reader.close()
    return jax.tree_util.tree_structure(abstract).unflatten(leaves), model

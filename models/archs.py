"""Architectures by name for the command line: the mixers shipped in ``ssdkit.models``, or a user's own.

``--arch NAME`` takes one of :data:`MIXERS`' names, or ``package.module:Class`` for a mixer class that
meets :class:`ssdkit.Mixer` (importable from the current directory or the installed packages; built with
no arguments). Every one trains, generates and evaluates as an :class:`ssdkit.MixerLM` of the shape
flags (:func:`lm_config`); its checkpoint folder is ``model.safetensors`` (one tensor per parameter path)
and ``mixer.json`` (the architecture, the mixer's settings and the shapes), read by :func:`load_checkpoint`.

The commands (``ssdkit train``, ``generate``, ``eval``) take a model as Mamba-2's config or an
:class:`ssdkit.MixerLM`; :func:`family` is the one place that tells the two apart, and gives what the
commands need of either (:class:`Mamba2Family`, :class:`MixerFamily`: vocabulary, loss, checkpoint, mesh
rules, the generation protocol, the streaming scorer).
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
from ssdkit.models import mamba2
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
    except (ImportError, SyntaxError) as err:
        raise ValueError(f"arch {arch!r}: cannot import {module_name} ({type(err).__name__}: {err}); the module "
                         f"must be importable from the current directory or the installed packages") from None
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


# ------------------------------------------------------------------------------ the model families
class Mamba2Family:
    """What the commands need of Mamba-2 (the model is its :class:`~ssdkit.models.mamba2.Mamba2Config`)."""

    @staticmethod
    def vocab_size(model: mamba2.Mamba2Config) -> int:
        """The logits' width: token ids must be below it."""
        return model.padded_vocab_size

    @staticmethod
    def loss(params, model: mamba2.Mamba2Config, tokens, segment_ids, remat: str):
        return mamba2.loss(params, model, tokens, segment_ids=segment_ids, remat=remat)

    @staticmethod
    def save(params, model: mamba2.Mamba2Config, folder: Path) -> None:
        mamba2.save_checkpoint(params, model, folder)

    @staticmethod
    def check_mesh(model: mamba2.Mamba2Config, mesh) -> None:
        from ssdkit.models.mamba2 import sharding as mamba2_sharding

        mamba2_sharding.config_check(model, mesh)

    @staticmethod
    def param_specs(params, model: mamba2.Mamba2Config, mesh):
        from ssdkit.models.mamba2 import sharding as mamba2_sharding

        return mamba2_sharding.param_specs(params, mesh)

    @staticmethod
    def language_model(model: mamba2.Mamba2Config) -> mamba2.Mamba2LM:
        """The model as :func:`ssdkit.generate` takes it (speculative ``verify`` / ``commit`` included)."""
        return mamba2.Mamba2LM(model)

    @staticmethod
    def conv_kernel(model: mamba2.Mamba2Config) -> int:
        """Taps of the short convs: a piece of a prompt split over ``seq`` needs K - 1 inputs of the one before."""
        return model.d_conv

    @staticmethod
    def init_cache(params, model: mamba2.Mamba2Config, batch: int):
        return mamba2.init_cache(model, batch, params.embedding.dtype)

    @staticmethod
    def score_window(params, model: mamba2.Mamba2Config, tokens, targets, weights, cache, *, segment_ids, reset):
        """:func:`ssdkit.models.mamba2.score_window`."""
        return mamba2.score_window(params, model, tokens, targets, weights, cache, segment_ids=segment_ids,
                                   reset=reset)


class MixerFamily:
    """What the commands need of a mixer model (the model is the :class:`ssdkit.MixerLM` itself)."""

    @staticmethod
    def vocab_size(model: MixerLM) -> int:
        return model.cfg.vocab_size

    @staticmethod
    def loss(params, model: MixerLM, tokens, segment_ids, remat: str):
        return model.loss(params, tokens, segment_ids=segment_ids, remat=remat)

    @staticmethod
    def save(params, model: MixerLM, folder: Path) -> None:
        """Safetensors, one tensor per PyTree path, and mixer.json (:func:`save_checkpoint`)."""
        save_checkpoint(params, model, folder)

    @staticmethod
    def check_mesh(model: MixerLM, mesh) -> None:
        model.check_mesh(mesh)

    @staticmethod
    def param_specs(params, model: MixerLM, mesh):
        """:meth:`ssdkit.MixerLM.param_specs`: heads over ``model`` where the mixer declares ``head_axes``."""
        return model.param_specs(params, mesh)

    @staticmethod
    def language_model(model: MixerLM) -> MixerLM:
        return model

    @staticmethod
    def conv_kernel(model: MixerLM) -> int:
        return model.cfg.conv_kernel

    @staticmethod
    def init_cache(params, model: MixerLM, batch: int):
        return model.init_cache(batch, params.embedding.dtype)

    @staticmethod
    def score_window(params, model: MixerLM, tokens, targets, weights, cache, *, segment_ids, reset):
        """:meth:`ssdkit.MixerLM.score_window`."""
        return model.score_window(params, tokens, targets, weights, cache, segment_ids=segment_ids, reset=reset)


def family(model) -> type[Mamba2Family] | type[MixerFamily]:
    """The family of ``model`` (a :class:`ssdkit.MixerLM`, or Mamba-2's config)."""
    return MixerFamily if isinstance(model, MixerLM) else Mamba2Family

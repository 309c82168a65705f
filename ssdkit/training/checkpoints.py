"""Training checkpoints and resumption: a small, typed layer over ``orbax.checkpoint``.

One checkpoint is one step directory holding two items: ``state`` (the :class:`~ssdkit.training.step.TrainState`
PyTree — step, float32 master weights, optimiser state, skip count — written by orbax's
``StandardCheckpointHandler``, i.e. tensorstore/OCDBT, the same format that later writes sharded
multi-host state) and ``meta`` (a JSON object: the data position, the RNG seed or key data, anything
else the loop needs to resume)::

    with TrainCheckpointer(run_dir, keep=3) as ckpt:
        if (last := ckpt.latest_step()) is not None:
            template = jax.eval_shape(lambda: TrainState.create(init_params(cfg, jax.random.key(0)), opt))
            state, meta = ckpt.restore(template)            # the newest complete checkpoint
            position = meta["data_position"]
        ...
        ckpt.save(int(state.step), state, {"data_position": position, "seed": seed})

Guarantees (orbax-checkpoint 0.12.8, whose ``CheckpointManager`` this wraps):

* **Atomic saves.** orbax writes the whole step into ``<step>.orbax-checkpoint-tmp`` beside the final
  directory (array data fsynced by tensorstore), writes ``commit_success.txt`` into it, and only then
  renames it to ``<step>`` (``AtomicRenameTemporaryPath``, the default on local and POSIX file systems;
  on ``gs://`` orbax uses the commit file alone). A process killed at any point of a save leaves at most
  a ``*.orbax-checkpoint-tmp`` directory, which orbax never lists as a step; :meth:`latest_step` and
  :meth:`restore` further accept a step directory only if it holds ``commit_success.txt`` and both
  items, so a half-copied directory (``rsync`` of a live run, a file system without atomic rename) is
  skipped too. A leftover temporary directory is replaced when that step is saved again; it is not
  swept on start-up, because a reader (an evaluation job) must never delete a writer's save in flight.
  The rename itself is not followed by a directory fsync, so an OS crash or power loss (not a process
  kill) right after a save may lose that newest checkpoint; the previous ones stay intact.
* **Keep the last K.** After each save the oldest complete checkpoints beyond ``keep`` are deleted.
* **Synchronous saves.** :meth:`save` returns once the checkpoint is committed. The train step donates
  its input state, so the arrays must be read before the next step runs anyway; on a small or
  single-host run the write is short. (orbax's asynchronous mode, which copies to host and writes in a
  background thread, is the upgrade path for large multi-host runs.)
* **The template decides.** :meth:`restore` takes a template state — concrete arrays or
  ``jax.eval_shape(...)`` of the same constructor — whose structure and shapes must match the
  checkpoint exactly (otherwise a :class:`ValueError` names the differing paths); dtypes and shardings
  come from the template (an array's ``.sharding``; a ``ShapeDtypeStruct``'s ``sharding`` if set).

Typed PRNG keys (``jax.random.key``) have no storable dtype and are refused with a :class:`TypeError`:
keep ``jax.random.key_data(key)`` (a ``uint32`` array) in the state, or its ``.tolist()`` in ``meta``,
and rebuild the key with ``jax.random.wrap_key_data`` after :meth:`restore`. Tuples in ``meta`` come
back as lists (JSON).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import jax
import numpy as np
import orbax.checkpoint as ocp

from ssdkit.training.step import TrainState

JSON: TypeAlias = "None | bool | int | float | str | list[JSON] | dict[str, JSON]"

#: Written by orbax into a step directory just before the commit rename (orbax's ``COMMIT_SUCCESS_FILE``).
COMMIT_FILE = "commit_success.txt"
_ITEMS = ("state", "meta")
_KEY_HINT = ("store jax.random.key_data(key) instead (in meta: jax.random.key_data(key).tolist()) and rebuild "
             "it with jax.random.wrap_key_data after restore")


def _is_typed_key(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _refuse_typed_keys(tree, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _is_typed_key(leaf):
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} is a typed PRNG key ({leaf.dtype}), which "
                            f"cannot be checkpointed: {_KEY_HINT}")


def _check_meta(meta: Mapping[str, JSON]) -> dict[str, JSON]:
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise TypeError(f"meta must be a mapping with str keys, got {type(meta).__name__}")

    def reject(obj):
        if _is_typed_key(obj):
            raise TypeError(f"meta holds a typed PRNG key ({obj.dtype}): {_KEY_HINT}")
        raise TypeError(f"meta must be JSON (None, bool, int, float, str, list, dict); got a "
                        f"{type(obj).__name__}: convert arrays and numpy scalars with .tolist() / int() / float()")

    try:
        text = json.dumps(dict(meta), allow_nan=False, default=reject)
    except ValueError as e:  # NaN / Infinity: not JSON
        raise TypeError(f"meta must be JSON: {e}") from None
    return json.loads(text)


def _abstract(leaf):
    """A restore target for one template leaf: shape, dtype and (where known) sharding."""
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    arr = np.asarray(leaf)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype)


def _dotted(key: tuple) -> str:
    return ".".join(str(k) for k in key)


def _mismatches(saved: Mapping[tuple, Any], wanted: Mapping[tuple, Any], limit: int = 6) -> list[str]:
    problems = []
    for label, keys in (("in the template but not in the checkpoint", [k for k in wanted if k not in saved]),
                        ("in the checkpoint but not in the template", [k for k in saved if k not in wanted])):
        if keys:
            shown = ", ".join(_dotted(k) for k in keys[:limit]) + (", ..." if len(keys) > limit else "")
            problems.append(f"{len(keys)} leaves {label} ({shown})")
    shapes = [f"{_dotted(k)}: template {tuple(wanted[k].shape)} vs checkpoint {tuple(saved[k].shape)}"
              for k in wanted if k in saved and tuple(wanted[k].shape) != tuple(saved[k].shape)]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (" + "; ".join(shapes[:limit])
                        + ("; ..." if len(shapes) > limit else "") + ")")
    return problems


class TrainCheckpointer:
    """Saves and restores ``(TrainState, meta)`` checkpoints under ``directory``, keeping the last ``keep``.

    ``directory`` is created by the first :meth:`save` (opening a checkpointer never creates it, so
    :meth:`latest_step` on a path that does not exist is simply None). Use it as a context manager or
    call :meth:`close`. See the module docstring for the atomicity and template rules.
    """

    def __init__(self, directory: str | Path, *, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
            enable_async_checkpointing=False,
            create=False,  # the first save creates it; a reader never does
            cleanup_tmp_directories=False,  # never delete another process's save in flight
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    # -- queries -------------------------------------------------------------------------------------

    def _complete(self, step: int) -> bool:
        path = self.directory / str(step)
        return (path / COMMIT_FILE).is_file() and all((path / item).is_dir() for item in _ITEMS)

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints on disk, ascending (re-read on every call)."""
        if not self.directory.is_dir():
            return []
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps() if self._complete(s))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None (no directory, or nothing committed yet)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save / restore ------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, meta: Mapping[str, JSON] | None = None) -> None:
        """Write ``state`` and ``meta`` as checkpoint ``step`` and commit it atomically (synchronous).

        Then deletes the oldest checkpoints beyond ``keep``. ``meta`` must be JSON; a step that already
        exists is an error (orbax's ``StepAlreadyExistsError``, a ValueError).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be an ssdkit.TrainState, got {type(state).__name__}")
        _refuse_typed_keys(state, "state")
        meta = _check_meta({} if meta is None else meta)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._manager.save(int(step), force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, JSON]]:
        """Load checkpoint ``step`` (default: :meth:`latest_step`) into the structure of ``template``.

        ``template`` is a TrainState of arrays or of ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` of the
        constructor); the result has its structure, dtypes and shardings. Raises FileNotFoundError when
        there is no such complete checkpoint, ValueError naming the differing leaves when the structure
        or a shape differs from the checkpoint's.
        """
        if not isinstance(template, TrainState):
            raise TypeError(f"template must be an ssdkit.TrainState (of arrays or ShapeDtypeStructs), "
                            f"got {type(template).__name__}")
        _refuse_typed_keys(template, "template")
        steps = self.all_steps()
        if step is None:
            if not steps:
                what = "does not exist" if not self.directory.exists() else "holds no complete checkpoint"
                raise FileNotFoundError(f"checkpoint directory {self.directory} {what}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no complete checkpoint for step {step} in {self.directory} "
                                    f"(complete steps: {steps})")
        abstract = jax.tree_util.tree_map(_abstract, template)
        saved_meta = self._manager.item_metadata(step).state
        saved = ocp.tree.to_flat_dict(getattr(saved_meta, "tree", saved_meta))
        problems = _mismatches(saved, ocp.tree.to_flat_dict(abstract))
        if problems:
            raise ValueError(f"checkpoint {self.directory / str(step)} does not match the template: "
                             + "; ".join(problems))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return restored.state, dict(restored.meta)

    def meta(self, step: int | None = None) -> dict[str, JSON]:
        """Checkpoint ``step``'s ``meta`` alone (default: :meth:`latest_step`'s), without its state."""
        steps = self.all_steps()
        step = steps[-1] if step is None and steps else step
        if step is None or step not in steps:
            raise FileNotFoundError(f"no complete checkpoint{'' if step is None else f' for step {step}'} in "
                                    f"{self.directory}")
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrainCheckpointer({str(self.directory)!r}, keep={self.keep})"


__all__ = ["JSON", "TrainCheckpointer"]

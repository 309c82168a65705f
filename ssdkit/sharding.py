"""Meshes and shardings: scale out on JAX's own SPMD machinery (``Mesh``, ``NamedSharding``, ``jax.jit``).

A mesh always has the four named axes of :data:`MESH_AXES` (size 1 when unused), so one set of
``PartitionSpec`` s serves every mesh shape:

* ``data`` — data parallelism: batch rows split across devices, parameters replicated; the compiler
  all-reduces the gradient.
* ``fsdp`` — fully sharded data parallelism (ZeRO-3): batch rows split as for ``data`` *and* every large
  parameter and its optimiser state split across the axis; the compiler gathers a weight where it is used
  (per layer inside the layer scan) and reduce-scatters its gradient.
* ``seq`` — sequence (context) parallelism: a sequence split in contiguous pieces; the scan and conv of
  ``ssdkit`` combine the pieces exactly (``ssdkit.core.mesh``) when traced under the mesh.
* ``model`` — tensor parallelism: a model's rules split heads over it; the scan of ``ssdkit`` runs each
  device's heads locally (``ssdkit.core.mesh``).

Batch arrays are split over ``("data", "fsdp")`` (:data:`BATCH_AXES`), their positions over ``seq``.
:func:`fsdp_spec` is the rule for a
weight under ``fsdp``; model packages name their arrays' specs with it (``ssdkit.models.mamba2.sharding``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model", "seq")
BATCH_AXES = ("data", "fsdp")
#: arrays with fewer elements stay replicated under ``fsdp``: sharding them saves nothing worth a collective
MIN_SHARDED_SIZE = 2**14


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=4,model=2"`` → ``{"data": 4, "model": 2}`` (axes of :data:`MESH_AXES`, sizes >= 1)."""
    shape = {}
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        name, sep, size = part.partition("=")
        if not sep or name not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh {spec!r}: expected AXIS=SIZE,... with axes {', '.join(MESH_AXES)} and sizes >= 1")
        if name in shape:
            raise ValueError(f"mesh {spec!r}: axis {name} given twice")
        shape[name] = int(size)
    return shape


def make_mesh(shape: Mapping[str, int] | str | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`~jax.sharding.Mesh` with every axis of :data:`MESH_AXES`, over ``devices`` (default: all,
    in every process). ``shape`` names the sizes (a dict or ``"data=4,model=2"``); axes not named get 1,
    except that with no ``shape`` at all every device goes to ``data``. The sizes must multiply to the
    number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh(shape) if isinstance(shape, str) else dict(shape or {"data": len(devices)})
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    dims = tuple(int(sizes.get(a, 1)) for a in MESH_AXES)
    if math.prod(dims) != len(devices):
        hint = ""
        if all(d.platform == "cpu" for d in devices):
            hint = (f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(dims)} set before "
                    f"JAX starts gives that many host devices")
        raise ValueError(f"mesh {dict(zip(MESH_AXES, dims, strict=True))} has {math.prod(dims)} devices, but "
                         f"{len(devices)} are given{hint}")
    return Mesh(np.asarray(devices, dtype=object).reshape(dims), MESH_AXES)


def fsdp_spec(shape: Sequence[int], mesh: Mesh, *, leading: int = 0, exclude: Sequence[int] = ()) -> P:
    """The ``fsdp`` rule for a weight of ``shape``: its largest axis divisible by the ``fsdp`` size is split
    (the first such on ties), skipping the first ``leading`` axes (e.g. a stacked layer axis) and the axes in
    ``exclude`` (e.g. one split over ``model``); arrays of fewer than :data:`MIN_SHARDED_SIZE` elements, or
    with no divisible axis, stay replicated."""
    n = mesh.shape["fsdp"]
    spec: list[str | None] = [None] * len(shape)
    if n > 1 and math.prod(shape) >= MIN_SHARDED_SIZE:
        candidates = [i for i in range(leading, len(shape)) if shape[i] % n == 0 and i not in exclude]
        if candidates:
            spec[max(candidates, key=lambda i: (shape[i], -i))] = "fsdp"
    return P(*spec)


def batch_spec(ndim: int) -> P:
    """Rows of a batch array of ``ndim`` axes (batch first) over :data:`BATCH_AXES`."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))


def sequence_spec(ndim: int = 2, seq: int | None = None, mesh: Mesh | None = None) -> P:
    """A (batch, seq, ...) array: rows over :data:`BATCH_AXES`, positions in contiguous pieces over ``seq``
    (sequence parallelism, ``ssdkit.core.mesh``). Given ``seq`` and ``mesh``, positions that do not
    divide into the ``seq`` axis stay whole."""
    axis = "seq" if seq is None or mesh is None or seq % mesh.shape["seq"] == 0 else None
    return P(BATCH_AXES, axis, *([None] * (ndim - 2)))


def batch_size_multiple(mesh: Mesh) -> int:
    """A batch's rows must be a multiple of this (the devices along :data:`BATCH_AXES`)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def named(mesh: Mesh, specs):
    """``NamedSharding`` s for a PyTree of ``PartitionSpec`` s (None leaves stay None)."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def place(tree, mesh: Mesh, specs):
    """``tree`` on ``mesh`` as ``specs`` say (a PyTree of ``PartitionSpec`` s matching ``tree``).

    On a mesh that spans several processes (after ``jax.distributed.initialize``) every process passes the
    same whole values (numpy, or arrays on its own devices) and keeps the shards its devices hold."""
    def put(leaf, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, named(mesh, specs))


def optimizer_specs(optimizer, opt_state, param_specs):
    """Specs for an optimiser state: every copy of the parameter tree in it (Adam's moments, ...) takes
    ``param_specs``; anything else (step counts) is replicated (``optax.tree_map_params``)."""
    import optax

    return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state, param_specs,
                                 transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))


def gather_weights(tree, specs=None):
    """FSDP's gather, where a layer uses its weights: while tracing under a mesh (``jax.set_mesh(mesh)``,
    or the train step of :func:`ssdkit.make_train_step` given ``shardings``) whose ``fsdp`` axis has more
    than one device, ``tree``'s arrays are constrained to ``specs`` (a matching PyTree of ``PartitionSpec``
    s without ``fsdp``: the tensor-parallel split a weight keeps; default whole on every device), so the
    compiler all-gathers each weight over ``fsdp`` (one layer's, inside the layer scan) rather than the
    activations. Anywhere else ``tree`` comes back unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get("fsdp", 1) == 1:
        return tree
    if specs is None:
        return jax.tree_util.tree_map(lambda a: jax.lax.with_sharding_constraint(a, P()), tree)
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, tree, specs)


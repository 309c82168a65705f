"""One of the processes of tests/test_sharding.py's multi-process test:

    python tests/multiprocess_check.py PROCESS_ID NUM_PROCESSES PORT WORK_DIR [--minimal]

Each process has 4 host devices; together they form one ``data=2,fsdp=4`` mesh over 8 devices
(``jax.distributed`` with a coordinator on 127.0.0.1, CPU collectives through gloo). Every process runs
the sharded prefill and two sharded training steps, and checks them against the same computation on one
of its own devices. The train state is then saved with orbax (each process writes its own shards into
WORK_DIR/checkpoints) and restored onto a ``data=4,fsdp=2`` mesh, bit for bit. Last, both processes run
``ssdkit train``'s loop (:func:`ssdkit.models.training.train`) with ``--mesh data=2,fsdp=4`` into WORK_DIR/train
(the test compares it with one process). Process 0 prints one JSON line
of errors; a failed check exits non-zero.

``--minimal`` (the default run) keeps the sharded prefill and the train state's save and restore onto
the other mesh (the state as created, before any step), and leaves out the training steps, the training
run and the generate command (``-m long``).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
work_dir = sys.argv[4]
minimal = "--minimal" in sys.argv[5:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id,
                           initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402 - after jax.distributed.initialize
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import ssdkit  # noqa: E402
from ssdkit import sharding  # noqa: E402
from ssdkit.models import cli, mamba2, training  # noqa: E402
from ssdkit.models.mamba2 import sharding as msh  # noqa: E402
from tests.sharding_check import GENERATE_ARGS, rel_err, train_run_config  # noqa: E402

CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=8)


def main() -> None:
    assert len(jax.devices()) == 4 * num_processes and len(jax.local_devices()) == 4, jax.devices()
    local = jax.local_devices()[0]
    init = jax.jit(mamba2.init_params, static_argnums=0, static_argnames="stacked")
    params = jax.device_put(init(CFG, jax.random.key(0), stacked=True), local)
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 24), 0, CFG.vocab_size, jnp.int32))
    seg = np.zeros_like(tokens)
    # eps = 1e-4, not 1e-8: Adam divides by sqrt(v) + eps, so with a tiny eps a gradient entry that is pure
    # rounding noise (~1e-9 where the largest is ~1e-2; the two programs sum in different orders) moves its
    # weight by up to ~lr either way. With eps = 1e-4 the update is Lipschitz in the gradient (constant
    # lr / eps), and the comparison tests the sharded step rather than Adam's amplification of noise.
    optimizer = ssdkit.adamw(1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1, clip_norm=1.0, eps=1e-4)

    # the reference: this process alone, on one of its devices
    ref_logits = np.asarray(mamba2.forward(params, CFG, jax.device_put(tokens, local)))
    if not minimal:
        ref_step = training.make_step(CFG, optimizer, remat="layer")
        ref_state = ssdkit.TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        ref_losses = []
        for _ in range(2):
            ref_state, m = ref_step(ref_state, (jax.device_put(tokens, local), jax.device_put(seg, local)))
            ref_losses.append(float(m.loss))

    mesh = sharding.make_mesh("data=2,fsdp=4")  # every device of every process
    p = msh.shard_params(params, mesh)
    assert not p.layers.in_proj_heads.is_fully_addressable  # split across the processes
    t, s = msh.shard_batch((tokens, seg), mesh)
    logits = multihost_utils.process_allgather(mamba2.forward(p, CFG, t), tiled=True)
    errors = {"processes": num_processes,
              "logits": float(np.max(np.abs(logits - ref_logits)) / np.max(np.abs(ref_logits)))}

    state = ssdkit.TrainState.create(p, optimizer)
    specs = msh.train_state_specs(state, optimizer, mesh)
    state = sharding.place(state, mesh, specs)
    if not minimal:
        shardings = (sharding.named(mesh, specs), NamedSharding(mesh, sharding.batch_spec(2)))
        step = training.make_step(CFG, optimizer, remat="layer", shardings=shardings)
        losses = []
        for _ in range(2):
            state, m = step(state, (t, s))
            losses.append(float(m.loss))  # replicated: every process holds it
        errors["step_losses"] = float(np.max(np.abs(np.subtract(losses, ref_losses)) / np.abs(ref_losses)))
        got = multihost_utils.process_allgather(state.params, tiled=True)
        errors["params_after_steps"] = rel_err(got, ref_state.params)

    # save sharded (each process its own shards), restore onto another mesh shape: 2 x 4 -> 4 x 2
    with ssdkit.TrainCheckpointer(f"{work_dir}/checkpoints") as ckpt:
        ckpt.save(2, state, {"mesh": "data=2,fsdp=4"})
    other = sharding.make_mesh("data=4,fsdp=2")
    other_specs = msh.train_state_specs(state, optimizer, other)
    template = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state,
                                      sharding.named(other, other_specs))
    with ssdkit.TrainCheckpointer(f"{work_dir}/checkpoints") as ckpt:
        restored, meta = ckpt.restore(template)
    assert meta == {"mesh": "data=2,fsdp=4"}, meta
    for a, t_ in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(template), strict=True):
        assert a.sharding == t_.sharding, (a.sharding, t_.sharding)
    whole = [multihost_utils.process_allgather(tree, tiled=True) for tree in (restored, state)]
    same = jax.tree_util.tree_map(np.array_equal, *whole)
    errors["restored_on_4x2_equal"] = all(jax.tree_util.tree_leaves(same))
    assert errors["restored_on_4x2_equal"], same
    # float32 sums reordered across devices (see tests/sharding_check.py)
    assert errors["logits"] < 1e-5, errors
    if minimal:
        if process_id == 0:
            print(json.dumps(errors), flush=True)
        jax.distributed.shutdown()
        return
    assert errors["step_losses"] < 1e-5 and errors["params_after_steps"] < 1e-4, errors
    training.train(train_run_config(f"{work_dir}/data{process_id}.txt", f"{work_dir}/train", "data=2,fsdp=4"),
                   log=lambda s: None)
    # `ssdkit generate --mesh` across both processes: process 0 prints the text (the test compares it)
    with open(f"{work_dir}/generate{process_id}.txt", "w") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(GENERATE_ARGS + ["--mesh", "fsdp=4,model=2"]) == 0
    if process_id == 0:
        print(json.dumps(errors), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()

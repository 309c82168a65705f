"""Scale-out figures: per-device memory of a sharded training step from XLA's memory analysis (compiled,
never run), and the measured cost of sharding on host devices.

    python benchmarks/scaling.py memory [--model 2.7b] [--meshes fsdp=8,...] [--batch 8] [--seq-len 2048]
    python benchmarks/scaling.py time [--meshes data=8,fsdp=8,seq=8] [--repeats 5]

``memory`` lowers and compiles ``ssdkit train``'s step (``ssdkit.models.training.make_step``: bfloat16 compute
over float32 master weights, AdamW, ``remat="layer"``) for abstract arrays placed on each mesh, and prints
what XLA's buffer assignment gives one device: arguments (the train state's shard and the batch's), outputs
(aliased to the donated arguments), and temporaries (activations, gathered weights, gradients). No array
is allocated, so a 2.7B-parameter state needs no memory here; ``--devices`` sets how many host devices
the meshes have (XLA_FLAGS=--xla_force_host_platform_device_count, set before jax loads).

``time`` runs a small Mamba-2's prefill and training step on one host device and on meshes over all the
host devices, alternating, and prints the medians and their ratios. Host devices share this machine's
cores, so this measures the overhead of the sharded programs (collectives, partitioning), not a speed-up.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("memory", help="per-device memory of the sharded train step (compiled, not run)")
    m.add_argument("--model", default="2.7b", help="a preset (130m ... 2.7b)")
    m.add_argument("--meshes", default="data=8;fsdp=8;data=2,fsdp=4;fsdp=4,seq=2;fsdp=2,seq=4",
                   help="meshes separated by ';' (\"one\": a single device)")
    m.add_argument("--batch", type=int, default=8, help="rows per step")
    m.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    m.add_argument("--devices", type=int, default=8)
    t = sub.add_parser("time", help="sharded programs on host devices against one device")
    t.add_argument("--meshes", default="data=8;fsdp=8;seq=8;data=2,fsdp=2,seq=2", help="meshes separated by ';'")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--devices", type=int, default=8)
    return p.parse_args(argv)


def _gib(n: float) -> str:
    return f"{n / 2**30:7.2f}"


def _mesh(spec: str):
    """A mesh over the first devices it needs ("one": a single device)."""
    import jax

    from ssdkit import sharding

    sizes = {} if spec == "one" else sharding.parse_mesh(spec)
    return sharding.make_mesh(sizes or {"data": 1}, devices=jax.devices()[:math.prod(sizes.values())])


def memory(args) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    import ssdkit
    from ssdkit import sharding
    from ssdkit.models import mamba2, training
    from ssdkit.models.mamba2 import sharding as msh

    cfg = mamba2.Mamba2Config.preset(args.model)
    optimizer = ssdkit.adamw(1e-4, total_steps=1000, warmup_steps=10)
    state = jax.eval_shape(lambda: ssdkit.TrainState.create(
        mamba2.init_params(cfg, jax.random.key(0), stacked=True), optimizer))
    n_params = sum(a.size for a in jax.tree_util.tree_leaves(state.params))
    state_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(state))
    print(f"# {args.model}: {n_params / 1e9:.3f}B parameters; float32 weights + AdamW moments = "
          f"{state_bytes / 2**30:.2f} GiB in all; batch {args.batch} x {args.seq_len} tokens, bfloat16 compute, "
          f"remat=layer; XLA {jax.default_backend()} memory analysis per device (GiB)")
    print(f"{'mesh':<22} {'state':>7} {'args':>7} {'temp':>7} {'peak~':>7}  compile s")
    for spec in args.meshes.split(";"):
        mesh = _mesh(spec)
        specs = msh.train_state_specs(state, optimizer, mesh)
        named = sharding.named(mesh, specs)
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, named)
        batch_sh = NamedSharding(mesh, sharding.sequence_spec(2))
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32, sharding=batch_sh)
        step = training.make_step(cfg, optimizer, remat="layer", compute_dtype="bfloat16",
                                  shardings=(named, batch_sh))
        t0 = time.perf_counter()
        compiled = step.lower(abstract, (tokens, tokens)).compile()
        seconds = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        shard = sum(a.dtype.itemsize * math.prod(s.shard_shape(a.shape))
                    for a, s in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(named), strict=True))
        # outputs alias the donated state, so peak ~ arguments + temporaries (+ any output not aliased)
        peak = ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
        print(f"{spec:<22} {_gib(shard)} {_gib(ma.argument_size_in_bytes)} {_gib(ma.temp_size_in_bytes)} "
              f"{_gib(peak)}  {seconds:8.1f}", flush=True)


def timing(args) -> None:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    import ssdkit
    from ssdkit import sharding
    from ssdkit.models import mamba2, training
    from ssdkit.models.mamba2 import sharding as msh

    cfg = mamba2.Mamba2Config(d_model=256, n_layer=4, vocab_size=512, d_state=64, headdim=64, chunk_size=64)
    batch, seq = 8, 1024
    params = mamba2.init_params(cfg, jax.random.key(0), stacked=True)
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
    optimizer = ssdkit.adamw(1e-3, total_steps=100, warmup_steps=1)

    def setup(spec):
        mesh = _mesh(spec)
        p = msh.shard_params(params, mesh)
        t = msh.shard_batch(tokens, mesh)
        state = ssdkit.TrainState.create(jax.tree_util.tree_map(lambda a: a.copy(), p), optimizer)
        specs = msh.train_state_specs(state, optimizer, mesh)
        state = sharding.place(state, mesh, specs)
        batch_sh = NamedSharding(mesh, sharding.sequence_spec(2))
        step = training.make_step(cfg, optimizer, remat="layer", shardings=(sharding.named(mesh, specs), batch_sh))

        def prefill():
            with jax.set_mesh(mesh):
                return mamba2.prefill(p, cfg, t)[0]

        holder = {"state": state}

        def train():
            holder["state"], m = step(holder["state"], (t, t * 0))
            return m.loss

        return {"prefill": prefill, "train step": train}

    specs = ["one"] + args.meshes.split(";")
    programs = {s: setup(s) for s in specs}
    for fns in programs.values():  # compile and warm up
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {(s, name): [] for s in specs for name in ("prefill", "train step")}
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit every program alike
        for s in specs:
            for name, fn in programs[s].items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn())
                times[s, name].append(time.perf_counter() - t0)
    print(f"# {cfg.n_layer} layers x d_model {cfg.d_model}, batch {batch} x {seq} tokens, float32; "
          f"{len(jax.devices())} host devices on {os.cpu_count()} cores; median of {args.repeats}, alternating")
    for name in ("prefill", "train step"):
        base = float(np.median(times["one", name]))
        for s in specs:
            med = float(np.median(times[s, name]))
            print(f"{name:<11} {s:<22} {med * 1e3:9.1f} ms   {med / base:5.2f}x one device", flush=True)


def main(argv=None) -> int:
    args = _args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    if "jax" not in sys.modules and flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    (memory if args.mode == "memory" else timing)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

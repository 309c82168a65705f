"""Run by tests/test_sharding.py in a subprocess with 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``): every mesh's sharded prefill, loss, gradients,
optimiser steps and greedy generation, plain and speculative (under the mesh, prompts right-padded as
``ssdkit generate --mesh`` pads them) against the same program on one device. Prints one JSON line of
errors per mesh (and per command); any failed check raises (non-zero exit).

    python tests/sharding_check.py [--long] [MESH ...]

Every run checks greedy generation outside the mesh context too (the sharded inputs alone), ``ssdkit train
--mesh`` against the run on one device, ``ssdkit generate --mesh`` with the shipped model against the
command on one device, and both commands with a layer defined in a test module (tests/custom_mixer.py,
``--arch tests.custom_mixer:GatedDelta``). The default run passes one mesh with three axes at once
(fsdp=2,model=2,seq=2); ``-m long`` passes seven more meshes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ssdkit
from ssdkit import sharding
from ssdkit.models import archs, mamba2, training
from ssdkit.models.mamba2 import sharding as msh
from tests.helpers import assert_same_greedy_tokens, greedy_margins

# the smallest sizes whose embedding and per-head projections reach ssdkit.sharding.MIN_SHARDED_SIZE (else
# fsdp replicates them and there is nothing to gather); 8 heads
CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=8)
B, T, STEPS, NEW = 8, 32, 3, 8  # rows split 8 ways at most
#: generation's right-padded prompts of T - NEW = 24 positions (over seq=8 pieces of 3, the conv's 3 past
#: inputs): rows end in the first, second, ... piece of the seq axis
LENGTHS = (24, 5, 13, 24, 3, 9, 18, 11)
#: speculative generation's drafts: prompt lookup, 2 a round whenever it finds any (one verify program)
SPECULATIVE = ssdkit.Speculative(ssdkit.PromptLookup(), draft_tokens=2, adaptive=False)


def rel_err(a, b) -> float:
    """The largest, over leaves, of max |a - b| / max |b| (each leaf against its own scale)."""
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))

    return max(one(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def run_steps(step, state, batch):
    losses = []
    for _ in range(STEPS):
        state, m = step(state, batch)
        losses.append(float(m.loss))
    return state, np.asarray(losses)


def ragged_margins(params, prompt, lengths, generated):
    """Greedy margins of each row's generated tokens, from one forward over its prompt and continuation
    (right-padded to T)."""
    full = np.zeros((B, T), np.int32)
    for r, n in enumerate(lengths):
        full[r, :n], full[r, n:n + NEW] = np.asarray(prompt)[r, :n], np.asarray(generated)[r]
    logits = np.asarray(mamba2.forward(params, CFG, jnp.asarray(full)))
    return np.stack([greedy_margins(logits[r, n - 1:n - 1 + NEW]) for r, n in enumerate(lengths)])


def main(meshes: list[str]) -> None:
    """Every check on each mesh."""
    assert len(jax.devices()) == 8, jax.devices()
    key = jax.random.key(0)
    params = jax.jit(mamba2.init_params, static_argnums=0, static_argnames="stacked")(CFG, key, stacked=True)
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size, jnp.int32)
    seg = jnp.asarray(np.repeat(np.arange(3), [13, 11, 8])[None].repeat(B, 0), jnp.int32)
    # eps = 1e-4, not 1e-8: Adam divides by sqrt(v) + eps, so with a tiny eps a gradient entry that is pure
    # rounding noise (~1e-9 where the largest is ~1e-2; the two programs sum in different orders) moves its
    # weight by up to ~lr either way. With eps = 1e-4 the update is Lipschitz in the gradient (constant
    # lr / eps), and the comparison tests the sharded step rather than Adam's amplification of noise.
    optimizer = ssdkit.adamw(1e-2, total_steps=10, warmup_steps=1, weight_decay=0.1, clip_norm=1.0, eps=1e-4)

    def loss_fn(p, t, s):
        return mamba2.loss(p, CFG, t, segment_ids=s, remat="layer")[0]

    ref_logits = mamba2.forward(params, CFG, tokens)
    ref_prefill = mamba2.prefill(params, CFG, tokens)
    ref_step = mamba2.decode_step(params, CFG, tokens[:, 0], copy(ref_prefill[1]))
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params, tokens, seg)
    ref_state, ref_losses = run_steps(training.make_step(CFG, optimizer, remat="layer"),
                                      ssdkit.TrainState.create(copy(params), optimizer), (tokens, seg))
    prompt, lengths = tokens[:, :T - NEW], jnp.asarray(LENGTHS, jnp.int32)  # with NEW tokens as long as `tokens`
    ref_gen = mamba2.generate(params, CFG, prompt, max_new_tokens=NEW, lengths=lengths)
    margins = ragged_margins(params, prompt, LENGTHS, ref_gen.tokens)
    ref_plain = mamba2.generate(params, CFG, prompt, max_new_tokens=NEW)
    plain_margins = ragged_margins(params, prompt, (T - NEW,) * B, ref_plain.tokens)

    for spec in meshes:
        mesh = sharding.make_mesh(spec)
        p = msh.shard_params(params, mesh)
        t, s = msh.shard_batch((tokens, seg), mesh)
        errors = {"mesh": spec}
        # parameters are split as the table says: nothing large is replicated under fsdp, heads under model
        m = mesh.shape["model"]
        want_heads = P(None, "model" if m > 1 else None, None, "fsdp" if mesh.shape["fsdp"] > 1 else None)
        assert p.layers.in_proj_heads.sharding.spec == want_heads, p.layers.in_proj_heads.sharding
        if mesh.shape["fsdp"] > 1:
            assert p.embedding.sharding.spec == P("fsdp", None), p.embedding.sharding
        # what an fsdp gather may produce: a layer's weight whole but for its split over model
        split = msh.layer_model_specs(CFG, mesh, stacked=False)
        weight_shapes = {params.embedding.shape} | {
            tuple(d // m if ax == "model" else d for d, ax in zip(a.shape[1:], tuple(sp), strict=True))
            for a, sp in zip(jax.tree_util.tree_leaves(params.layers),
                             jax.tree_util.tree_leaves(split, is_leaf=lambda x: isinstance(x, P)), strict=True)}
        weight_shapes |= {(s[0] * s[1], s[2]) for s in weight_shapes if len(s) == 3}  # as the 2-D matrix multiplied
        weight_shapes |= {(1, *s) for s in weight_shapes}  # a layer sliced from the stack keeps a unit axis
        errors["logits"] = rel_err(mamba2.forward(p, CFG, t), ref_logits)
        with jax.set_mesh(mesh):  # traced under the mesh: gather_weights gathers each layer's weights
            errors["logits_under_mesh"] = rel_err(mamba2.forward(p, CFG, t), ref_logits)
            hlo = mamba2.model._forward.lower(p, CFG, t, False).compile().as_text()  # the program just run
        if mesh.shape["fsdp"] > 1:
            heads = f"{CFG.nheads // m},{2 * CFG.headdim},{CFG.d_model}"
            assert re.search(rf"f32\[(1,)?{heads}\]\S* all-gather", hlo), "no in_proj_heads gather"
        with jax.set_mesh(mesh):  # the sequence split over seq, heads over model (ssdkit.core.mesh)
            logits, cache = mamba2.prefill(p, CFG, t)
            # one decode step from that cache: under model the state stays split by head (never gathered)
            token = msh.shard_batch(tokens[:, 0], mesh)
            hlo = mamba2.model._decode_step.lower(p, CFG, token, cache).compile().as_text()
            step_logits, step_cache = mamba2.decode_step(p, CFG, token, copy(cache))
        errors["prefill"] = max(rel_err(logits, ref_prefill[0]), rel_err(cache, ref_prefill[1]))
        errors["decode_step"] = rel_err(step_logits, ref_step[0])
        if m > 1:
            assert tuple(step_cache.state.sharding.spec)[2] == "model", step_cache.state.sharding
        decode_gathers = {tuple(int(d) for d in dims.split(",") if d) for dims in
                          re.findall(r"= [a-z0-9]+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)}
        assert decode_gathers <= weight_shapes, decode_gathers
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(p, t, s)
        errors["loss"] = abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))
        errors["grads"] = rel_err(grads, ref_grads)
        with jax.set_mesh(mesh):  # as `ssdkit generate --mesh` runs it: prompts right-padded, split over seq
            gen = mamba2.generate(p, CFG, msh.shard_batch(prompt, mesh), max_new_tokens=NEW,
                                  lengths=msh.shard_batch(lengths, mesh))
        assert_same_greedy_tokens(gen.tokens, ref_gen.tokens, margins, tie=1e-4, name=f"generate on {spec}")
        errors["generated_equal"] = bool(np.array_equal(np.asarray(gen.tokens), np.asarray(ref_gen.tokens)))
        # the sharded inputs alone, outside the mesh context
        gen = mamba2.generate(p, CFG, msh.shard_batch(prompt, mesh), max_new_tokens=NEW)
        assert_same_greedy_tokens(gen.tokens, ref_plain.tokens, plain_margins, tie=1e-4,
                                  name=f"generate outside the mesh context on {spec}")
        errors["plain_generated_equal"] = bool(np.array_equal(np.asarray(gen.tokens), np.asarray(ref_plain.tokens)))
        # speculative (prompt lookup, greedy): plain greedy's one-device tokens. Past the prefill nothing splits
        # over seq: a round verifies k + 1 = 3 tokens, which no seq axis > 1 divides (ssdkit.core.mesh)
        with jax.set_mesh(mesh):
            gen = mamba2.generate(p, CFG, msh.shard_batch(prompt, mesh), max_new_tokens=NEW,
                                  lengths=msh.shard_batch(lengths, mesh), speculative=SPECULATIVE)
        assert_same_greedy_tokens(gen.tokens, ref_gen.tokens, margins, tie=1e-4, name=f"speculative on {spec}")
        assert int(gen.speculation.verifies) > 0, gen.speculation  # drafts were verified under the mesh
        errors["speculative_equal"] = bool(np.array_equal(np.asarray(gen.tokens), np.asarray(ref_gen.tokens)))
        errors["speculative_command_equal"] = check_speculative_command(spec, params, prompt, ref_gen.tokens, margins)

        state = ssdkit.TrainState.create(copy(p), optimizer)  # the step donates its state
        specs = msh.train_state_specs(state, optimizer, mesh)
        state = sharding.place(state, mesh, specs)
        batch_sh = NamedSharding(mesh, sharding.sequence_spec(2))
        step = training.make_step(CFG, optimizer, remat="layer", shardings=(sharding.named(mesh, specs), batch_sh))
        hlo = step.lower(state, (t, s)).compile().as_text()
        state, losses = run_steps(step, state, (t, s))
        # What the step gathers: under fsdp one layer's weight at a time (inside the layer scan) and the
        # embedding, never a whole stacked field and never activations; under data alone, nothing.
        gathered = [tuple(int(d) for d in dims.split(",") if d) for dims in
                    re.findall(r"= [a-z0-9]+\[([\d,]*)\][^\n]*? all-gather(?:-start)?\(", hlo)]
        errors["all_gathers"] = [list(g) for g in sorted(set(gathered))]
        # under seq, also each piece's final state and total decay (ssdkit.sequence_parallel), per layer
        n, rows = mesh.shape["seq"], B // sharding.batch_size_multiple(mesh)
        heads = CFG.nheads // m  # each device's heads
        piece_states = {(n, rows, heads, CFG.headdim, CFG.d_state), (n, rows, heads)} if n > 1 else set()
        assert set(gathered) <= weight_shapes | piece_states, (gathered, weight_shapes, piece_states)
        assert bool(set(gathered) & weight_shapes) == (mesh.shape["fsdp"] > 1), gathered
        assert piece_states <= set(gathered), gathered
        errors["step_losses"] = float(np.max(np.abs(losses - ref_losses) / np.abs(ref_losses)))
        errors["params_after_steps"] = rel_err(state.params, ref_state.params)
        # the state stays sharded from step to step: the step's outputs carry the input specs
        got = jax.tree_util.tree_map(lambda a: a.sharding.spec, state.params)
        want = jax.tree_util.tree_map(lambda a: a, specs.params, is_leaf=lambda x: isinstance(x, P))
        for g, w in zip(jax.tree_util.tree_leaves(got, is_leaf=lambda x: isinstance(x, P)),
                        jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, P)), strict=True):
            assert tuple(g) + (None,) * (len(w) - len(g)) == tuple(w), (g, w)

        print(json.dumps(errors), flush=True)
        # float32 sums reordered across devices: logits and loss to ~1e-6, gradients to ~1e-6 of each
        # tensor's largest entry, each tensor after three AdamW steps (eps above) to ~1e-5; bounds 10x that
        assert errors["logits"] < 1e-5 and errors["logits_under_mesh"] < 1e-5 and errors["loss"] < 1e-5, errors
        assert errors["grads"] < 1e-4 and errors["step_losses"] < 1e-5 and errors["decode_step"] < 1e-5, errors
        assert errors["params_after_steps"] < 1e-4, errors


def check_speculative_command(mesh: str, params, prompt, expected, margins, row: int = 2) -> bool:
    """``ssdkit generate --speculative lookup --mesh``, greedy, on the checkpoint of ``params`` and row ``row`` of the
    prompts (13 ids: right-padded to split over seq): the one-device tokens of that row (``expected``, ``margins``:
    plain greedy generation's, which speculative decoding equals). Returns whether they are equal outright."""
    import contextlib
    import io
    import tempfile

    from ssdkit.models import cli

    with tempfile.TemporaryDirectory() as tmp:
        mamba2.save_checkpoint(params, CFG, tmp)
        ids = ",".join(str(int(t)) for t in np.asarray(prompt)[row, :LENGTHS[row]])
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["generate", "--model", tmp, "--prompt-ids", ids, "--max-new-tokens", str(NEW),
                             "--speculative", "lookup", "--draft-tokens", "1", "--mesh", mesh]) == 0
    got = np.asarray([int(t) for t in buf.getvalue().split()])
    assert_same_greedy_tokens(got, np.asarray(expected)[row], np.asarray(margins)[row], tie=1e-4,
                              name=f"ssdkit generate --speculative --mesh {mesh}")
    return bool(np.array_equal(got, np.asarray(expected)[row]))


def train_run_config(data: str, out: str, mesh: str | None, **options) -> training.TrainRunConfig:
    """A tiny ``ssdkit train`` run (its data file written here), ``options`` replacing its settings (``arch``,
    ``d_model``, ...); the test runs it on one process too."""
    with open(data, "w") as f:
        f.write("def f(x):\n    return x * 2\n" * 200)
    return training.TrainRunConfig(**{**dict(data=data, out=out, mesh=mesh, d_model=32, n_layer=2, d_state=8,
                                             headdim=16, chunk_size=8, seq_len=32, batch_size=8, steps=3,
                                             warmup_steps=1, eval_every=3, save_every=3, progress=False), **options})


def compare_train_commands(tmp: Path, mesh: str, **options) -> dict:
    """``ssdkit train --mesh`` into ``tmp/mesh`` and on one device into ``tmp/one``: the same losses, held-out
    loss (unless ``held_out=0``) and exported weights (returns and prints the errors)."""
    logs = {}
    for name, m in (("one", None), ("mesh", mesh)):
        cfg = train_run_config(str(tmp / "data.txt"), str(tmp / name), m, **options)
        training.train(cfg, log=lambda s: None)
        logs[name] = [json.loads(line) for line in (tmp / name / "log.jsonl").read_text().splitlines()]
    one, sharded = ([e["loss"] for e in logs[k]] for k in ("one", "mesh"))
    held = options.get("held_out", 1) > 0
    errors = {"train_command_mesh": mesh, "arch": options.get("arch", "mamba2"),
              "losses": float(np.max(np.abs(np.subtract(sharded, one)) / np.abs(one))),
              "held_out": abs(logs["mesh"][-1]["held_out_loss"] - logs["one"][-1]["held_out_loss"]) if held else 0.0}
    load = archs.load_checkpoint if "arch" in options else mamba2.load_checkpoint
    errors["exported_weights"] = rel_err(load(tmp / "mesh" / "model")[0], load(tmp / "one" / "model")[0])
    print(json.dumps(errors), flush=True)
    assert errors["losses"] < 1e-5 and errors["held_out"] < 1e-4 and errors["exported_weights"] < 1e-4, errors
    return errors


def check_train_command(mesh: str) -> None:
    """``ssdkit train --mesh``: the same losses and exported weights as the run on one device."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        compare_train_commands(Path(tmp), mesh)


#: a layer defined in a test module, not in the package (tests/custom_mixer.py)
CUSTOM_ARCH = "tests.custom_mixer:GatedDelta"


def check_custom_mixer(mesh: str) -> None:
    """A user's own layer on a mesh, through the commands: ``ssdkit train --arch tests.custom_mixer:GatedDelta
    --mesh`` equals the run on one device (losses and exported weights; d_model 64, so that the
    embedding and the larger weights are split over fsdp, every head-major array over model by the mixer's
    ``head_axes``), and ``ssdkit generate --mesh`` from that export (greedy, 13 prompt ids right-padded to
    split over seq) chooses one device's tokens: each the argmax of the one-device logits after the tokens
    before it (barring a near tie)."""
    import contextlib
    import io
    import tempfile

    from ssdkit.models import cli

    with tempfile.TemporaryDirectory() as tmp:
        # nothing held out: the held-out loss is the training loss's program, checked on a mesh for Mamba-2 above
        compare_train_commands(Path(tmp), mesh, arch=CUSTOM_ARCH, d_model=64, held_out=0.0, remat="none")
        folder = Path(tmp) / "one" / "model"
        (folder / "tokenizer.json").unlink()  # ids in, ids out, no end-of-document stop
        params, model = archs.load_checkpoint(folder)
        specs = model.param_specs(params, sharding.make_mesh(mesh)).layers.mixer
        assert specs.wv == P(None, "fsdp", "model") and specs.wo == P(None, "model", "fsdp"), specs
        assert model.param_specs(params, sharding.make_mesh(mesh)).embedding == P(None, "fsdp")
        ids = [100, 101, 102, 32, 120, 61, 49, 10, 100, 101, 102, 40, 41]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["generate", "--model", str(folder), "--prompt-ids", ",".join(map(str, ids)),
                             "--max-new-tokens", str(NEW), "--mesh", mesh]) == 0
        got = [int(t) for t in buf.getvalue().split()]
        # one device's greedy choices after the same tokens: the argmax of one forward over prompt + generation
        logits = np.asarray(jax.jit(model.forward)(params, jnp.asarray([ids + got], jnp.int32)))[0, len(ids) - 1:-1]
        want = np.argmax(logits, axis=-1)
        assert len(got) == NEW
        assert_same_greedy_tokens(got, want, greedy_margins(logits), tie=1e-4,
                                  name=f"ssdkit generate --mesh {mesh} with {CUSTOM_ARCH}")
        print(json.dumps({"custom_mixer_mesh": mesh, "greedy_equal": bool(np.array_equal(got, want))}), flush=True)


#: ``ssdkit generate`` with the shipped model, sampled (a prompt of 18 ids)
GENERATE_ARGS = ["generate", "--prompt", "def fibonacci(n):", "--max-new-tokens", "24", "--temperature", "0.8",
                 "--top-p", "0.95", "--seed", "1"]


def check_generate_command(mesh: str) -> None:
    """``ssdkit generate --mesh`` with the shipped model: the same text as on one device (a prompt of 18 ids,
    right-padded to split over seq=4)."""
    import contextlib
    import io

    from ssdkit.models import cli

    texts = []
    for extra in ([], ["--mesh", mesh]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(GENERATE_ARGS + extra) == 0
        texts.append(buf.getvalue())
    print(json.dumps({"generate_command_mesh": mesh, "same_text": texts[0] == texts[1]}), flush=True)
    assert texts[0] == texts[1] and len(texts[0]) > len("def fibonacci(n):\n"), texts


if __name__ == "__main__":
    main(sys.argv[1:] or ["fsdp=2,model=2,seq=2"])
    # the commands: a training run on a mesh, and generation with the shipped model
    check_train_command("data=2,model=2,seq=2")
    check_generate_command("model=2,seq=4")
    # a layer of a test module, trained and generated from on a mesh through the same commands
    check_custom_mixer("fsdp=2,model=2,seq=2")

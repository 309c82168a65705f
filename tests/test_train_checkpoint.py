"""Training checkpoints (ssdkit.training.checkpoints): exact round trips, keep-last-K, resuming in a new process
equals the uninterrupted run, a save killed before its commit is never restored, clear mismatch errors."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssdkit
from ssdkit.models import mamba2, training
from ssdkit.training.checkpoints import COMMIT_FILE, TrainCheckpointer
from ssdkit.training.step import TrainState

# The run is `ssdkit train`'s on tests/test_training_cli.py's tiny flags (byte vocabulary, batch 4 x 24,
# --lr 1e-2 --warmup-steps 1 --steps 4): the same compiled steps, a fresh run's and a resumed run's
# (restored arrays are committed to their device, fresh ones are not: two programs), built once a run.
CFG = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=257, d_state=8, headdim=16, chunk_size=8)
REPO = Path(__file__).resolve().parents[1]
SEED, N, K = 1234, 4, 2  # N steps in all, the checkpoint after K


def _optimizer():
    # A schedule that depends on the step count in opt_state: resuming with a lost count would diverge.
    return ssdkit.adamw(1e-2, total_steps=N, warmup_steps=1)


def _batch(step: int):
    """The data stream, keyed by step: the data position to resume from is the step itself. Packed rows:
    (tokens, segment_ids), as ``ssdkit train`` feeds its step."""
    rng = np.random.default_rng(SEED + step)
    tokens = rng.integers(0, CFG.vocab_size, (4, 24))
    segments = np.cumsum(rng.random((4, 24)) < 0.1, axis=1)
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(segments, jnp.int32)


def _new_state():
    return TrainState.create(mamba2.init_params(CFG, jax.random.key(SEED), stacked=True), _optimizer())


def _step_fn():
    return training.make_step(CFG, _optimizer(), remat="layer")


def _host(tree):
    return jax.tree_util.tree_map(np.asarray, tree)


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _subprocess_env() -> dict[str, str]:
    """A child process on the CPU with the suite's persistent XLA cache (tests/conftest.py): what it
    compiles is shared with the rest of the run, and what the run compiled is not compiled again."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if jax.config.jax_compilation_cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def resume_main(directory: str) -> None:
    """The resumed run, in a fresh process started by :func:`straight` next to the uninterrupted one:
    compile, wait for the step-K checkpoint to be committed, restore it, finish the N steps, save."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree_util.tree_map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=device),
                                      jax.eval_shape(_new_state))
    step_fn = _step_fn()
    # Compile while the other process trains (same shapes and shardings as the restored state: a cache hit).
    step_fn(jax.tree_util.tree_map(lambda t: jax.device_put(np.zeros(t.shape, t.dtype), device), template),
            _batch(0))
    with TrainCheckpointer(directory) as ckpt:
        deadline = time.monotonic() + 120
        while ckpt.latest_step() is None:  # only a committed checkpoint ever shows up here
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        state, meta = ckpt.restore(template)
        assert meta["seed"] == SEED and int(state.step) == meta["data_position"] == K, meta
        for s in range(meta["data_position"], N):
            state, _ = step_fn(state, _batch(s))
        ckpt.save(N, state, {"data_position": N, "seed": SEED})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """N uninterrupted steps, saving a checkpoint after K of them, while a new process (started first, so
    that both compile at once) resumes from that checkpoint: (directory, state after K, after N, process)."""
    directory = tmp_path_factory.mktemp("run")
    script = f"from tests.test_train_checkpoint import resume_main; resume_main({str(directory)!r})"
    resumed = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=_subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        step_fn, state = _step_fn(), _new_state()
        with TrainCheckpointer(directory) as ckpt:
            for s in range(N):
                state, _ = step_fn(state, _batch(s))
                if s + 1 == K:
                    ckpt.save(K, state, {"data_position": K, "seed": SEED})
                    at_k = _host(state)  # the next step donates `state`
        yield directory, at_k, _host(state), resumed
    finally:
        if resumed.poll() is None:
            resumed.kill()
        resumed.communicate()


def _toy_state(v: float) -> TrainState:
    return TrainState(step=jnp.int32(v), params={"w": jnp.full((3, 4), v, jnp.float32), "b": jnp.arange(3.0) + v},
                      opt_state=(jnp.int32(7), {"w": jnp.full((3, 4), -v, jnp.float32)}), skipped=jnp.int32(0))


def test_round_trip_is_exact(straight, tmp_path):
    """Mamba-2 params and AdamW moments after real steps, into concrete and eval_shape templates, in both
    layouts (stacked layers, as trained, and per layer)."""
    directory, at_k, after_n, _ = straight
    with TrainCheckpointer(directory) as ckpt:
        state, meta = ckpt.restore(_new_state(), step=K)  # a concrete template
        assert meta == {"data_position": K, "seed": SEED}
        assert isinstance(state, TrainState) and int(state.step) == K
        _assert_trees_equal(_host(state), at_k)
    per_layer = dataclasses.replace(after_n, params=mamba2.unstack_layers(after_n.params))
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(N, per_layer, {"note": [1, "two", None, 3.5, {"nested": True}]})
        state, meta = ckpt.restore(jax.eval_shape(lambda: per_layer))
        assert meta == {"note": [1, "two", None, 3.5, {"nested": True}]}
        _assert_trees_equal(_host(state), per_layer)


def test_resume_in_a_new_process_equals_the_uninterrupted_run(straight):
    directory, _, after_n, resumed = straight
    _, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err[-4000:]
    with TrainCheckpointer(directory) as ckpt:
        assert ckpt.all_steps() == [K, N]
        resumed, meta = ckpt.restore(jax.eval_shape(_new_state))
    assert meta["data_position"] == N and int(resumed.step) == N
    # Exact: both processes run the same compiled step on the same inputs on the same machine.
    _assert_trees_equal(_host(resumed), after_n)


def test_keeps_the_last_k(tmp_path):
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:
        for s in range(1, 6):
            ckpt.save(s, _toy_state(s), {"data_position": s})
        assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
    with TrainCheckpointer(tmp_path, keep=2) as ckpt:  # a new checkpointer sees the same steps
        state, meta = ckpt.restore(_toy_state(0), step=4)
    assert meta == {"data_position": 4}
    _assert_trees_equal(_host(state), _host(_toy_state(4)))
    with pytest.raises(ValueError, match="keep must be a positive int"):
        TrainCheckpointer(tmp_path, keep=0)


_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    from ssdkit.training.checkpoints import TrainCheckpointer
    from tests.test_train_checkpoint import _toy_state

    async def killed_before_commit(self):  # all data is written; the commit rename would come next
        os.kill(os.getpid(), signal.SIGKILL)

    with TrainCheckpointer(sys.argv[1]) as ckpt:
        ckpt.save(1, _toy_state(1), {"data_position": 1})
        ckpt.save(2, _toy_state(2), {"data_position": 2})
        atomicity.AtomicRenameTemporaryPath.finalize = killed_before_commit
        ckpt.save(3, _toy_state(3), {"data_position": 3})
    print("not killed")
""")


def test_a_save_killed_before_its_commit_is_never_restored(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(tmp_path)], cwd=REPO, env=_subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-4000:])
    # What the kill left: step 3's arrays written into orbax's temporary directories, never renamed.
    (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith("3")]
    assert tmp.name == "3.orbax-checkpoint-tmp" and list(tmp.glob("state.orbax-checkpoint-tmp/d/*")), \
        sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    # A step directory without orbax's commit file (a half-finished copy of a run directory) and a stray one.
    (tmp_path / "4" / "state").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    with TrainCheckpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        state, meta = ckpt.restore(_toy_state(0))
        assert meta == {"data_position": 2}
        _assert_trees_equal(_host(state), _host(_toy_state(2)))
        with pytest.raises(FileNotFoundError, match="no complete checkpoint for step 3"):
            ckpt.restore(_toy_state(0), step=3)
        ckpt.save(3, _toy_state(3), {"data_position": 3})  # saving the step again replaces the leftover
        assert ckpt.latest_step() == 3 and (tmp_path / "3" / COMMIT_FILE).is_file()
        _assert_trees_equal(_host(ckpt.restore(_toy_state(0))[0]), _host(_toy_state(3)))
    assert not tmp.exists()


def test_mismatches_and_missing_checkpoints_are_clear_errors(tmp_path):
    missing = tmp_path / "never-written"
    with TrainCheckpointer(missing) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ckpt.restore(_toy_state(0))
    assert not missing.exists()  # opening a checkpointer to read never creates the directory

    opt = _optimizer()
    template = lambda cfg: jax.eval_shape(  # noqa: E731
        lambda: TrainState.create(mamba2.init_params(cfg, jax.random.key(0)), opt))
    with TrainCheckpointer(tmp_path / "run") as ckpt:
        (tmp_path / "run").mkdir()
        with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
            ckpt.restore(template(CFG))
        ckpt.save(0, jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, t.dtype), template(CFG)))  # per layer
        with pytest.raises(ValueError, match=r"in the template but not in the checkpoint \(.*params\.layers\.1\."):
            ckpt.restore(template(dataclasses.replace(CFG, n_layer=2)))
        with pytest.raises(ValueError, match=r"shape mismatches \(.*params\.layers\.0\.norm: template \(48,\) vs "
                                             r"checkpoint \(32,\)"):
            ckpt.restore(template(dataclasses.replace(CFG, d_model=48)))
        stacked = jax.eval_shape(lambda t: dataclasses.replace(t, params=mamba2.stack_layers(t.params)),
                                 template(CFG))
        with pytest.raises(ValueError, match="but not in the checkpoint"):
            ckpt.restore(stacked)

        key_state = dataclasses.replace(_toy_state(1), opt_state=jax.random.key(0))
        with pytest.raises(TypeError, match=r"typed PRNG key .*jax\.random\.key_data"):
            ckpt.save(1, key_state)
        with pytest.raises(TypeError, match=r"typed PRNG key .*jax\.random\.key_data"):
            ckpt.save(1, _toy_state(1), {"rng": jax.random.key(0)})
        with pytest.raises(TypeError, match="meta must be JSON"):
            ckpt.save(1, _toy_state(1), {"position": np.int64(3)})
        with pytest.raises(TypeError, match="meta must be JSON"):
            ckpt.save(1, _toy_state(1), {"loss": float("nan")})
        assert ckpt.all_steps() == [0]
        # A key stored as key data round-trips exactly.
        key = jax.random.key(7)
        ckpt.save(1, dataclasses.replace(_toy_state(1), opt_state=jax.random.key_data(key)),
                  {"rng": jax.random.key_data(key).tolist()})
        state, meta = ckpt.restore(dataclasses.replace(_toy_state(0), opt_state=jax.random.key_data(key)))
        np.testing.assert_array_equal(jax.random.key_data(jax.random.wrap_key_data(state.opt_state)),
                                      jax.random.key_data(key))
        assert meta["rng"] == jax.random.key_data(key).tolist()

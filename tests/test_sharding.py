"""Scale-out on JAX's SPMD machinery: mesh parsing, the fsdp rule, and (in subprocesses with 4 or 8 host
devices: tests/sharding_check.py, tests/spmd_check.py, tests/multiprocess_check.py) sharded prefill, loss,
gradients, AdamW steps and generation equal to one device, with the state kept sharded and only per-layer
weights gathered; the scan and conv's mesh forms equal to one device; and two processes equal to one.

The subprocesses compile as the run does (its ``XLA_FLAGS``): each check compares a sharded program with the
one-device program compiled alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ssdkit import sharding
from tests.helpers import cli_on_the_suite_cache

ROOT = Path(__file__).resolve().parents[1]

def _env(devices: int) -> dict[str, str]:
    """A check subprocess's environment: ``devices`` host devices, the run's own ``XLA_FLAGS`` (its code
    generation: README's first pass compiles at XLA's cheapest), and ``ssdkit generate``'s persistent XLA
    cache in the suite's run cache (tests/conftest.py), not ~/.cache."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if jax.config.jax_compilation_cache_dir:
        env["SSDKIT_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    return env


def test_parse_and_make_mesh():
    assert sharding.parse_mesh("data=4, model=2") == {"data": 4, "model": 2}
    mesh = sharding.make_mesh()  # every device on data
    assert mesh.axis_names == sharding.MESH_AXES and mesh.shape["data"] == len(jax.devices())
    assert sharding.batch_size_multiple(mesh) == len(jax.devices())
    for bad, message in (("data=0", "sizes >= 1"), ("rows=2", "expected AXIS=SIZE"), ("data=1,data=1", "twice"),
                         ("data=3", "has 3 devices")):
        with pytest.raises(ValueError, match=message):
            sharding.make_mesh(bad)


def test_fsdp_rule():
    mesh = sharding.make_mesh()
    assert sharding.fsdp_spec((296, 64), mesh) == P(None, None)  # fsdp = 1: nothing to split
    fake = type("FakeMesh", (), {"shape": {"fsdp": 4}})()
    assert sharding.fsdp_spec((296, 64), fake) == P("fsdp", None)  # the largest divisible axis
    assert sharding.fsdp_spec((2, 296, 64), fake, leading=1) == P(None, "fsdp", None)  # never the layer axis
    assert sharding.fsdp_spec((2, 297, 64), fake, leading=1) == P(None, None, "fsdp")
    assert sharding.fsdp_spec((64,), fake) == P(None)  # small: replicated
    assert sharding.fsdp_spec((3, 99999), fake) == P(None, None)  # nothing divisible


#: the long run's meshes: every axis alone and in pairs
LONG_MESHES = ["data=8", "data=4,fsdp=2", "fsdp=8", "seq=8", "model=8", "data=2,model=4",
               "data=2,fsdp=2,seq=2"]


@pytest.mark.parametrize("meshes", [["fsdp=2,model=2,seq=2"],  # three axes at once; data in the commands
                                    pytest.param(LONG_MESHES, marks=pytest.mark.long)],
                         ids=["fsdp-model-seq", "long"])
def test_sharded_programs_equal_one_device(meshes):
    """tests/sharding_check.py: per mesh, sharded prefill, decode, loss, gradients, AdamW steps and greedy
    generation (prompts right-padded and split over seq, as `ssdkit generate --mesh` runs them) equal one
    device's, and so does generation from the sharded inputs outside the mesh context, speculative generation
    (prompt lookup; its verifies of k + 1 tokens unsplit over seq) in the library and through `ssdkit generate
    --speculative lookup --mesh`; `ssdkit train --mesh` and `ssdkit generate --mesh` (the shipped model) equal
    the commands on one device, and so do both commands with a layer defined in a test module
    (`--arch tests.custom_mixer:GatedDelta`: trained on fsdp=2,model=2,seq=2, its export generating there)."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_check.py"), *meshes],
                          env=_env(8), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count('"mesh"') == len(meshes) and proc.stdout.count('"generated_equal"') == len(meshes)
    assert proc.stdout.count('"plain_generated_equal"') == len(meshes), proc.stdout
    assert proc.stdout.count('"speculative_command_equal"') == len(meshes), proc.stdout
    assert "train_command_mesh" in proc.stdout and "generate_command_mesh" in proc.stdout, proc.stdout
    assert '"arch": "tests.custom_mixer:GatedDelta"' in proc.stdout, proc.stdout
    assert '"custom_mixer_mesh"' in proc.stdout, proc.stdout


@pytest.mark.parametrize("devices,args,counts", [(4, [], (5, 1, 1)),
                                                 pytest.param(8, ["--float32"], (12, 4, 8), marks=pytest.mark.long)],
                         ids=["4-devices-float64", "8-devices-float64-float32"])
def test_scan_and_conv_on_meshes_equal_one_device(devices, args, counts):
    """ssd_scan and causal_conv1d under meshes with seq and model axes (tests/spmd_check.py): values and
    gradients equal the one-device calls (float64 to 1e-13; with --float32, under -m long, float32 to 1e-5
    of the largest entry). On 4 devices every branch of the mesh forms, a rank-one (delta-rule) transition
    on seq and model together; on 8 (-m long) the meshes of 8, three axes at once among them, every
    head-group case and rank-one w, u per head and per group."""
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "spmd_check.py"), *args],
                          env=_env(devices), capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    scans, heads, rank_one = counts
    assert proc.stdout.count('"rank_one"') == rank_one, proc.stdout
    assert proc.stdout.count('"scan"') == scans and proc.stdout.count('"conv"') == 4 and '"errors"' in proc.stdout
    assert proc.stdout.count('"heads"') == heads, proc.stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.long)], ids=["minimal", "full"])
def test_two_processes_equal_one(tmp_path, full, cli_cache):
    """2 processes x 4 host devices on 127.0.0.1 (jax.distributed, gloo): a data=2,fsdp=4 prefill equals one
    process's; the train state saved by both processes (each its shards) restores bit for bit onto a
    data=4,fsdp=2 mesh; bounded in time, and both processes are always reaped. The full run (-m long) adds
    two training steps against one process's, and `ssdkit train --mesh` and `ssdkit generate --mesh` on
    both processes against the commands in this one."""
    port = _free_port()
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]  # noqa: SIM115 - closed below
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "multiprocess_check.py"), str(i), "2", str(port),
                               str(tmp_path), *([] if full else ["--minimal"])],
                              env=_env(4), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in out)
    assert '"logits"' in out[0] and '"restored_on_4x2_equal": true' in out[0], out[0][-2000:]
    state_dir = tmp_path / "checkpoints" / "2" / "state"  # orbax's OCDBT: one store per process
    assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
    if not full:
        return
    assert '"params_after_steps"' in out[0], out[0][-2000:]
    # `ssdkit train --mesh data=2,fsdp=4` on both processes: the losses and exported weights of one process
    sys.path.insert(0, str(ROOT))
    from ssdkit.models import mamba2, training
    from tests.sharding_check import rel_err, train_run_config

    training.train(train_run_config(str(tmp_path / "data.txt"), str(tmp_path / "one"), None), log=lambda s: None)
    logs = {k: [json.loads(line) for line in (tmp_path / k / "log.jsonl").read_text().splitlines()]
            for k in ("one", "train")}
    losses = [[e["loss"] for e in logs[k]] for k in ("one", "train")]
    assert len(losses[1]) == 3 and np.allclose(losses[1], losses[0], rtol=1e-5, atol=0), losses
    got, want = (mamba2.load_checkpoint(tmp_path / k / "model")[0] for k in ("train", "one"))
    assert rel_err(got, want) < 1e-4  # three AdamW steps, float32 sums reordered (tests/sharding_check.py)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["checkpoints", "log.jsonl", "loss.png", "model"]
    # `ssdkit generate --mesh fsdp=4,model=2` across both processes: one process's text, printed once
    import contextlib
    import io

    from ssdkit.models import cli
    from tests.sharding_check import GENERATE_ARGS

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(GENERATE_ARGS) == 0
    assert (tmp_path / "generate0.txt").read_text() == buf.getvalue() and len(buf.getvalue()) > 20
    assert (tmp_path / "generate1.txt").read_text() == ""


def test_tensor_parallel_rules():
    """The model axis splits per-head fields by head, B and C's by group only when the groups divide, and a
    model axis that does not divide the heads is refused by name."""
    from ssdkit.models import mamba2
    from ssdkit.models.mamba2 import sharding as msh

    def fake(**sizes):
        return type("FakeMesh", (), {"shape": {"data": 1, "fsdp": 1, "model": 1, "seq": 1, **sizes}})()

    for groups, split in ((1, False), (2, True)):
        cfg = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=64, d_state=16, headdim=16, ngroups=groups)
        params = jax.eval_shape(lambda cfg=cfg: mamba2.init_params(cfg, jax.random.key(0), stacked=True))
        specs = msh.param_specs(params, fake(model=2)).layers
        assert specs.in_proj_heads == P(None, "model", None, None) and specs.out_proj == P(None, None, "model")
        assert specs.in_proj_dt == P(None, "model", None) and specs.conv_x_weight == P(None, None, "model")
        assert specs.in_proj_groups == P(None, "model" if split else None, None, None)
        assert specs.conv_bc_weight == P(None, None, "model" if split else None)
        both = msh.param_specs(params, fake(model=2, fsdp=4)).layers
        assert both.in_proj_heads == P(None, "model", None, "fsdp")  # fsdp takes the largest other axis
        cache = msh.cache_specs(mamba2.init_cache(cfg, 2), fake(model=2), cfg)
        assert cache.state == P(None, ("data", "fsdp"), "model", None, None)
        assert cache.conv[1] == P(None, ("data", "fsdp"), None, "model" if split else None)
    with pytest.raises(ValueError, match="'model' axis of 3 devices does not divide the model's 8 heads"):
        msh.config_check(cfg, fake(model=3))

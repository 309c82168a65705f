"""Run by tests/test_engine.py (``-m long``) in a subprocess with 4 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``): the serving engine on meshes (data-parallel slots;
fully sharded and tensor-parallel weights) against the engine on one device, greedy requests of several
lengths (more than the slots), tokens compared up to near ties with the one-device run's margins.

    python tests/serve_mesh_check.py [MESH ...]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit import sharding
from ssdkit.inference.engine import Engine, EngineConfig, GenerationRequest
from ssdkit.models import archs, mamba2
from tests.helpers import assert_same_greedy_tokens

# the sharding check's smallest sizes whose arrays fsdp splits; 8 heads
CFG = mamba2.Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=8)
CONFIG = EngineConfig(slots=4, snapshot_interval=16, max_new_tokens=16, max_prompt_tokens=64)
TIE = 1e-4


def run(engine: Engine, requests) -> list[list]:
    events = [[] for _ in requests]
    for i, r in enumerate(requests):
        engine.submit(r, events[i].append)
    engine.run_until_idle()
    return events


def main(meshes: list[str]) -> None:
    params = mamba2.init_params(CFG, jax.random.key(3), jnp.float32)
    family = archs.family(CFG)
    model = family.language_model(CFG)
    rng = np.random.default_rng(0)
    requests = [GenerationRequest(tuple(int(i) for i in rng.integers(0, 256, n)), 12, logprobs=2)
                for n in (5, 20, 33, 9, 17, 3)]
    one = run(Engine(model, params, CONFIG), requests)
    for spec in meshes:
        mesh = sharding.make_mesh(spec)
        placed = sharding.place(params, mesh, family.param_specs(params, CFG, mesh))
        got = run(Engine(model, placed, CONFIG, mesh=mesh), requests)
        for a, b in zip(got, one, strict=True):
            tokens = [[e.token for e in ev if e.token is not None] for ev in (a, b)]
            margins = np.array([[e.top[0][1] - e.top[1][1] for e in b if e.token is not None]])
            assert_same_greedy_tokens(np.array(tokens[:1]), np.array(tokens[1:]), margins, tie=TIE, name=spec)
        print(f"{spec}: {len(requests)} requests equal the one-device engine's", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["data=4", "fsdp=2,model=2", "data=2,model=2"])

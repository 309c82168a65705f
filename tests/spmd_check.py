"""Run by tests/test_sharding.py in a subprocess with 8 host devices: the scan and conv on a mesh
(``ssdkit.core.mesh``: sequence pieces over ``seq``, heads over ``model``, taken when traced under the mesh)
against the same calls on one device, in float64 and float32, values and gradients; and the errors for
sequences that do not split. Prints one JSON line per case; a failed check raises."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import ssdkit  # noqa: E402
from ssdkit import sharding  # noqa: E402

MESHES = ("seq=8", "data=2,seq=4", "fsdp=4,seq=2", "model=4,data=2", "model=2,seq=4", "fsdp=2,model=2,seq=2")
# Same sums, reassociated across pieces: float64 to ~1e-15 of each array's largest entry, float32 to ~1e-7;
# bounds 100x that.
TOL = {jnp.float64: 1e-13, jnp.float32: 1e-5}


def rel_err(a, b) -> float:
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))

    return max(one(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def check_scan(dtypes=(jnp.float64,)) -> None:
    ks = jax.random.split(jax.random.key(0), 5)
    batch, seq, heads, head_dim, state, groups = 4, 64, 4, 8, 16, 2
    seg = jnp.asarray(np.repeat(np.arange(4), [10, 25, 13, 16])[None].repeat(batch, 0), jnp.int32)
    meshes = iter(MESHES * 8)  # each case on one of the meshes, in turn
    for dtype in dtypes:
        for decay in ("scalar", "diagonal"):
            tail = (state,) if decay == "diagonal" else ()
            x = jax.random.normal(ks[0], (batch, seq, heads, head_dim), dtype)
            log_a = -0.3 * jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, heads, *tail), dtype))
            b = jax.random.normal(ks[2], (batch, seq, groups, state), dtype)
            c = jax.random.normal(ks[3], (batch, seq, groups, state), dtype)
            h0 = jax.random.normal(ks[4], (batch, heads, head_dim, state), dtype)
            for chunk, h0_, seg_ in ((8, h0, seg), (5, None, None), (16, h0, None)):
                def scan(x, log_a, b, c, h0, chunk=chunk, seg_=seg_):
                    return ssdkit.ssd_scan(x, log_a, b, c, chunk_size=chunk, initial_state=h0, segment_ids=seg_)

                def objective(*args, scan=scan):
                    y, final = scan(*args)
                    return jnp.sum(jnp.sin(y)) + jnp.sum(final**2)

                args = (x, log_a, b, c, h0_)
                grad = jax.grad(objective, argnums=(0, 1, 2, 3, 4) if h0_ is not None else (0, 1, 2, 3))
                want, want_grad = jax.jit(scan)(*args), jax.jit(grad)(*args)
                for spec in [next(meshes)]:
                    with jax.set_mesh(sharding.make_mesh(spec)):
                        lowered = jax.jit(scan).lower(*args).as_text()
                        got, got_grad = jax.jit(scan)(*args), jax.jit(grad)(*args)
                    assert "shard_map" in lowered or "sdy.manual_computation" in lowered, "no mesh form taken"
                    errors = {"scan": spec, "dtype": jnp.dtype(dtype).name, "decay": decay, "chunk": chunk,
                              "y": rel_err(got[0], want[0]), "state": rel_err(got[1], want[1]),
                              "grads": rel_err(got_grad, want_grad)}
                    print(json.dumps(errors), flush=True)
                    assert max(errors["y"], errors["state"], errors["grads"]) < TOL[dtype], errors


def check_head_groups() -> None:
    """Heads over model with every relation of heads to groups: B, C split by group (8 groups over 8), one
    group read by every device, whole groups per device, and heads of one device straddling groups."""
    ks = jax.random.split(jax.random.key(2), 5)
    batch, seq, head_dim, state = 2, 32, 4, 8
    for heads, groups, spec in ((8, 8, "model=8"), (8, 1, "model=4,seq=2"), (8, 2, "model=2,data=2,seq=2"),
                                (6, 3, "model=2,data=4")):
        x = jax.random.normal(ks[0], (batch, seq, heads, head_dim))
        log_a = -0.3 * jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, heads)))
        b, c = (jax.random.normal(k, (batch, seq, groups, state)) for k in ks[2:4])
        h0 = jax.random.normal(ks[4], (batch, heads, head_dim, state))

        def scan(x, log_a, b, c, h0):
            return ssdkit.ssd_scan(x, log_a, b, c, chunk_size=8, initial_state=h0)

        grad = jax.grad(lambda *a: jnp.sum(jnp.sin(scan(*a)[0])) + jnp.sum(scan(*a)[1] ** 2), argnums=(0, 1, 2, 3, 4))
        args = (x, log_a, b, c, h0)
        want, want_grad = jax.jit(scan)(*args), jax.jit(grad)(*args)
        with jax.set_mesh(sharding.make_mesh(spec)):
            got, got_grad = jax.jit(scan)(*args), jax.jit(grad)(*args)
        errors = {"heads": heads, "groups": groups, "mesh": spec, "y": rel_err(got[0], want[0]),
                  "state": rel_err(got[1], want[1]), "grads": rel_err(got_grad, want_grad)}
        print(json.dumps(errors), flush=True)
        assert max(errors["y"], errors["state"], errors["grads"]) < TOL[jnp.float64], errors  # float64 inputs


def check_conv() -> None:
    ks = jax.random.split(jax.random.key(1), 4)
    batch, seq, chan, k = 4, 64, 12, 4
    x = jax.random.normal(ks[0], (batch, seq, chan))  # float64 (x64 is on)
    weight, bias = jax.random.normal(ks[1], (k, chan)), jax.random.normal(ks[2], (chan,))
    window = jax.random.normal(ks[3], (batch, k - 1, chan))
    lengths = jnp.array([64, 0, 17, 33])  # ends in pieces 7, none (the carried window), 2 and 4 of 8
    seg = jnp.asarray(np.repeat(np.arange(4), [10, 25, 13, 16])[None].repeat(batch, 0), jnp.int32)
    cases = ({}, {"lengths": lengths}, {"segment_ids": seg}, {"lengths": lengths, "segment_ids": seg})
    for kw, spec in zip(cases, ("seq=8", "data=2,seq=4", "model=2,seq=4", "fsdp=2,model=2,seq=2"), strict=True):
        def conv(x, window, kw=kw):
            return ssdkit.causal_conv1d(x, weight, bias, window=window, **kw)

        grad = jax.grad(lambda x, w: sum(jnp.sum(jnp.sin(o)) for o in conv(x, w)), argnums=(0, 1))
        want, want_grad = conv(x, window), jax.jit(grad)(x, window)
        with jax.set_mesh(sharding.make_mesh(spec)):
            got, got_grad = jax.jit(conv)(x, window), jax.jit(grad)(x, window)
        errors = {"conv": spec, "options": sorted(kw), "y": rel_err(got[0], want[0]),
                  "window": rel_err(got[1], want[1]), "grads": rel_err(got_grad, want_grad)}
        print(json.dumps(errors), flush=True)
        assert max(errors["y"], errors["window"], errors["grads"]) < TOL[jnp.float64], errors  # float64 inputs


def check_errors() -> None:
    with jax.set_mesh(sharding.make_mesh("seq=8")):
        x = jnp.zeros((1, 12, 2, 4))
        try:
            jax.jit(lambda x: ssdkit.ssd_scan(x, jnp.zeros((1, 12, 2)), jnp.zeros((1, 12, 1, 4)),
                                              jnp.zeros((1, 12, 1, 4)), chunk_size=4))(x)
        except ValueError as e:
            assert "cannot be split in 8 equal pieces" in str(e), e
        else:
            raise AssertionError("a sequence of 12 over seq=8 did not raise")
        try:
            jax.jit(lambda x: ssdkit.causal_conv1d(x, jnp.ones((4, 3))))(jnp.zeros((1, 16, 3)))
        except ValueError as e:
            assert "shorter than the kernel's 3 past inputs" in str(e), e
        else:
            raise AssertionError("pieces of 2 with a 4-tap kernel did not raise")
    print(json.dumps({"errors": "ok"}), flush=True)


if __name__ == "__main__":
    assert len(jax.devices()) == 8, jax.devices()
    # float64 sweeps every mesh; float32 (the same paths at the other precision) with --float32 (-m long)
    check_scan((jnp.float64, jnp.float32) if "--float32" in sys.argv[1:] else (jnp.float64,))
    check_head_groups()
    check_conv()
    check_errors()

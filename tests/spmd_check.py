"""Run by tests/test_sharding.py in a subprocess with 4 or 8 host devices: the scan and conv on a mesh
(``ssdkit.core.mesh``: sequence pieces over ``seq``, heads over ``model``, taken when traced under the mesh)
against the same calls on one device, values and gradients (one compiled program for both, per side); and
the errors for sequences that do not split. Prints one JSON line per case; a failed check raises.

    python tests/spmd_check.py [--float32]

With 4 devices (the default run) the cases run in float64 on meshes of 4, taking every branch of the mesh
forms with few compiled programs (some cases on two meshes against one reference): seq alone and with
rows over data or fsdp, heads over model with and without seq, B and C split by group, one group read by
a run of heads, heads straddling groups; and one rank-one (delta-rule, ``w, u``) case on seq and model
together. With 8 devices (``-m long``) each of the six scan cases, four head-group cases and four rank-one
cases (w, u per head and per group) runs on its own mesh of 8, three axes at once among them, and
``--float32`` repeats the scan and rank-one cases in float32."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import ssdkit  # noqa: E402
from ssdkit import sharding  # noqa: E402

#: per device count: the scan cases (decay, chunk, with an initial state, with segment ids, the meshes each
#: runs on against one reference), the head-group cases (heads, groups, mesh) and the conv cases' meshes.
#: On 4 devices the scan cases take every branch with few programs: B and C split by group (model=2 over 2
#: groups), one group read by a run of heads (model=4 over 2 groups), seq with rows over data / fsdp / none,
#: model alone; the head-group case adds heads straddling groups. On 8 devices each case runs on one mesh.
SCAN_CASES = {
    4: (("scalar", 8, True, True, ("data=2,seq=2", "model=4")), ("diagonal", 5, False, False, ("model=2,seq=2",
        "fsdp=2,seq=2")), ("diagonal", 16, True, False, ("seq=4",))),
    8: (("scalar", 8, True, True, ("seq=8",)), ("scalar", 5, False, False, ("data=2,seq=4",)),
        ("scalar", 16, True, False, ("fsdp=4,seq=2",)), ("diagonal", 8, True, True, ("model=4,data=2",)),
        ("diagonal", 5, False, False, ("model=2,seq=4",)), ("diagonal", 16, True, False, ("fsdp=2,model=2,seq=2",))),
}
HEAD_CASES = {
    4: ((6, 3, "model=2,fsdp=2"),),
    8: ((8, 8, "model=8"), (8, 1, "model=4,seq=2"), (8, 2, "model=2,data=2,seq=2"), (6, 3, "model=2,data=4")),
}
#: the rank-one (delta-rule) cases: (w, u "per-head" or "per-group", decay, chunk, mesh). Gated-delta-rule
#: inputs (per-channel gates: KDA), an initial state and resets, one at a piece start. On 4 devices one mesh
#: with seq and model together (pieces combined, B and C split by group, w and u by head); on 8 (-m long)
#: w and u per group, split by group or read by a run of heads.
RANK_ONE_CASES = {
    4: (("per-head", "scalar", 5, "model=2,seq=2"),),
    8: (("per-head", "scalar", 5, "model=2,seq=4"), ("per-head", "diagonal", 8, "model=4,seq=2"),
        ("per-group", "scalar", 16, "model=2,data=2,seq=2"), ("per-group", "diagonal", 5, "model=4,seq=2")),
}
#: per row: row 0 resets at 16 (4 devices) and 32 (8), a piece start on seq=2; row 1 carries its state across
RANK_ONE_SEGMENTS = {4: ((5, 11, 9, 7), (9, 23)), 8: ((10, 22, 17, 15), (20, 44))}
CONV_MESHES = {4: ("seq=4", "data=2,seq=2", "model=2,seq=2", "fsdp=2,seq=2"),
               8: ("seq=8", "data=2,seq=4", "model=2,seq=4", "fsdp=2,model=2,seq=2")}
SEGMENTS = {4: (5, 12, 7, 8), 8: (10, 25, 13, 16)}  # four documents in a row of 8 * n positions
#: the conv's rows end in the last piece of 8, none (the carried window), and two pieces in between
LENGTHS = {4: (32, 0, 9, 17), 8: (64, 0, 17, 33)}
# Same sums, reassociated across pieces: float64 to ~1e-15 of each array's largest entry, float32 to ~1e-7;
# bounds 100x that.
TOL = {jnp.float64: 1e-13, jnp.float32: 1e-5}


def rel_err(a, b) -> float:
    def one(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(y))), 1e-30))

    return max(one(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def values_and_grads(fn, argnums):
    """One program: ``fn``'s outputs and the gradients of sum(sin(outputs[0])) + sum(outputs[1] ** 2)."""
    def objective(*args):
        out = fn(*args)
        return jnp.sum(jnp.sin(out[0])) + jnp.sum(out[1] ** 2), out

    grad = jax.grad(objective, argnums=argnums, has_aux=True)
    return jax.jit(lambda *args: grad(*args)[::-1])  # (outputs, grads)


def compare(fn, args, argnums, specs, *, lowered_check=False):
    """For each mesh in ``specs``: (outputs, grads) errors of ``fn`` traced under it against one device."""
    want = values_and_grads(fn, argnums)(*args)
    for spec in specs:
        with jax.set_mesh(sharding.make_mesh(spec)):
            program = values_and_grads(fn, argnums)
            if lowered_check:
                lowered = program.lower(*args).as_text()
                assert "shard_map" in lowered or "sdy.manual_computation" in lowered, "no mesh form taken"
            got = program(*args)
        yield spec, [rel_err(g, w) for g, w in zip(got[0], want[0], strict=True)], rel_err(got[1], want[1])


def check_scan(n: int, dtypes) -> None:
    ks = jax.random.split(jax.random.key(0), 5)
    batch, seq, heads, head_dim, state, groups = 4, 8 * n, 4, 8, 16, 2  # pieces of 8 over seq=n
    seg = jnp.asarray(np.repeat(np.arange(4), SEGMENTS[n])[None].repeat(batch, 0), jnp.int32)
    for dtype in dtypes:
        for decay, chunk, with_h0, with_seg, specs in SCAN_CASES[n]:
            tail = (state,) if decay == "diagonal" else ()
            x = jax.random.normal(ks[0], (batch, seq, heads, head_dim), dtype)
            log_a = -0.3 * jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, heads, *tail), dtype))
            b = jax.random.normal(ks[2], (batch, seq, groups, state), dtype)
            c = jax.random.normal(ks[3], (batch, seq, groups, state), dtype)
            h0 = jax.random.normal(ks[4], (batch, heads, head_dim, state), dtype)

            # chunks of 8 (one per piece of 8), 5 (not dividing a piece), 16 (longer than a piece of seq=n)
            def scan(x, log_a, b, c, h0=None, chunk=chunk, seg_=seg if with_seg else None):
                return ssdkit.ssd_scan(x, log_a, b, c, chunk_size=chunk, initial_state=h0, segment_ids=seg_)

            args = (x, log_a, b, c) + ((h0,) if with_h0 else ())
            for spec, (y, final), grads in compare(scan, args, tuple(range(len(args))), specs, lowered_check=True):
                errors = {"scan": spec, "dtype": jnp.dtype(dtype).name, "decay": decay, "chunk": chunk,
                          "y": y, "state": final, "grads": grads}
                print(json.dumps(errors), flush=True)
                assert max(errors["y"], errors["state"], errors["grads"]) < TOL[dtype], errors


def check_rank_one(n: int, dtypes) -> None:
    """A diagonal-plus-rank-one transition (``w, u``) on meshes against one device: Gated DeltaNet's
    ``S_t = S_{t-1} α_t (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ`` (KDA with a per-channel gate), the gradients taken
    with respect to q, k, v, g, β and the initial state."""
    ks = jax.random.split(jax.random.key(3), 6)
    batch, seq, heads, head_dim, state, groups = 2, 8 * n, 4, 8, 8, 2
    seg = jnp.asarray(np.stack([np.repeat(np.arange(len(s)), s) for s in RANK_ONE_SEGMENTS[n]]), jnp.int32)
    for dtype in dtypes:
        for layout, decay, chunk, spec in RANK_ONE_CASES[n]:
            kh = heads if layout == "per-head" else groups  # keys and queries: per head or per group
            q = jax.random.normal(ks[0], (batch, seq, kh, state), dtype)
            k = jax.random.normal(ks[1], (batch, seq, kh, state), dtype)
            v = jax.random.normal(ks[2], (batch, seq, heads, head_dim), dtype)
            g = -0.3 * jax.nn.softplus(jax.random.normal(ks[3], (batch, seq, heads) + (
                (state,) if decay == "diagonal" else ()), dtype))
            beta = jax.random.normal(ks[4], (batch, seq, kh), dtype)
            h0 = jax.random.normal(ks[5], (batch, heads, head_dim, state), dtype)

            def scan(q, k, v, g, beta, h0, chunk=chunk, layout=layout):
                k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
                bk = jax.nn.sigmoid(beta)[..., None] * k
                if layout == "per-head":  # w = -exp(g)·β·k (per channel for KDA), u = k
                    alpha = jnp.exp(g) if g.ndim == 4 else jnp.exp(g)[..., None]
                    w, u = -alpha * bk, k
                else:  # per group: the delta rule's term beside the decay, A_t = diag(exp(g_t)) - β_t k_t k_tᵀ
                    w, u = -bk, k
                return ssdkit.ssd_scan(v, g, bk, q * state**-0.5, chunk_size=chunk, initial_state=h0,
                                       segment_ids=seg, w=w, u=u)

            args = (q, k, v, g, beta, h0)
            [(_, (y, final), grads)] = compare(scan, args, tuple(range(6)), [spec], lowered_check=True)
            errors = {"rank_one": spec, "dtype": jnp.dtype(dtype).name, "layout": layout, "decay": decay,
                      "chunk": chunk, "y": y, "state": final, "grads": grads}
            print(json.dumps(errors), flush=True)
            assert max(errors["y"], errors["state"], errors["grads"]) < TOL[dtype], errors


def check_head_groups(n: int) -> None:
    """Heads over model with every relation of heads to groups: B, C split by group (as many groups as
    devices), one group read by every device, whole groups per device, and heads of one device straddling
    groups."""
    ks = jax.random.split(jax.random.key(2), 5)
    batch, seq, head_dim, state = 2, 32, 4, 8
    for heads, groups, spec in HEAD_CASES[n]:
        x = jax.random.normal(ks[0], (batch, seq, heads, head_dim))
        log_a = -0.3 * jax.nn.softplus(jax.random.normal(ks[1], (batch, seq, heads)))
        b, c = (jax.random.normal(k, (batch, seq, groups, state)) for k in ks[2:4])
        h0 = jax.random.normal(ks[4], (batch, heads, head_dim, state))

        def scan(x, log_a, b, c, h0):
            return ssdkit.ssd_scan(x, log_a, b, c, chunk_size=8, initial_state=h0)

        [(_, (y, final), grads)] = compare(scan, (x, log_a, b, c, h0), (0, 1, 2, 3, 4), [spec])
        errors = {"heads": heads, "groups": groups, "mesh": spec, "y": y, "state": final, "grads": grads}
        print(json.dumps(errors), flush=True)
        assert max(errors["y"], errors["state"], errors["grads"]) < TOL[jnp.float64], errors  # float64 inputs


def check_conv(n: int) -> None:
    ks = jax.random.split(jax.random.key(1), 4)
    batch, seq, chan, k = 4, 8 * n, 12, 4  # pieces of 8 over seq=n
    x = jax.random.normal(ks[0], (batch, seq, chan))  # float64 (x64 is on)
    weight, bias = jax.random.normal(ks[1], (k, chan)), jax.random.normal(ks[2], (chan,))
    window = jax.random.normal(ks[3], (batch, k - 1, chan))
    lengths = jnp.array(LENGTHS[n])
    seg = jnp.asarray(np.repeat(np.arange(4), SEGMENTS[n])[None].repeat(batch, 0), jnp.int32)
    cases = ({}, {"lengths": lengths}, {"segment_ids": seg}, {"lengths": lengths, "segment_ids": seg})
    for kw, spec in zip(cases, CONV_MESHES[n], strict=True):
        def conv(x, window, kw=kw):
            return ssdkit.causal_conv1d(x, weight, bias, window=window, **kw)

        [(_, (y, win), grads)] = compare(conv, (x, window), (0, 1), [spec])
        errors = {"conv": spec, "options": sorted(kw), "y": y, "window": win, "grads": grads}
        print(json.dumps(errors), flush=True)
        assert max(errors["y"], errors["window"], errors["grads"]) < TOL[jnp.float64], errors  # float64 inputs


def check_errors(n: int) -> None:
    with jax.set_mesh(sharding.make_mesh(f"seq={n}")):
        odd = n + n // 2  # not a multiple of n
        x = jnp.zeros((1, odd, 2, 4))
        try:
            jax.jit(lambda x: ssdkit.ssd_scan(x, jnp.zeros((1, odd, 2)), jnp.zeros((1, odd, 1, 4)),
                                              jnp.zeros((1, odd, 1, 4)), chunk_size=4))(x)
        except ValueError as e:
            assert f"cannot be split in {n} equal pieces" in str(e), e
        else:
            raise AssertionError(f"a sequence of {odd} over seq={n} did not raise")
        try:
            jax.jit(lambda x: ssdkit.causal_conv1d(x, jnp.ones((4, 3))))(jnp.zeros((1, 2 * n, 3)))
        except ValueError as e:
            assert "shorter than the kernel's 3 past inputs" in str(e), e
        else:
            raise AssertionError("pieces of 2 with a 4-tap kernel did not raise")
    print(json.dumps({"errors": "ok"}), flush=True)


if __name__ == "__main__":
    n = len(jax.devices())
    assert n in SCAN_CASES, jax.devices()
    # float64 sweeps every mesh; float32 (the same paths at the other precision) with --float32 (-m long)
    check_scan(n, (jnp.float64, jnp.float32) if "--float32" in sys.argv[1:] else (jnp.float64,))
    check_rank_one(n, (jnp.float64, jnp.float32) if "--float32" in sys.argv[1:] else (jnp.float64,))
    check_head_groups(n)
    check_conv(n)
    check_errors(n)

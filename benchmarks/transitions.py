"""The transition kinds side by side in one run: scalar (Mamba-2's SSD), diagonal (GLA), and each with the
delta rule's rank-one term (Gated DeltaNet, KDA), at one shape (default H=8, P=N=128, T=4096, batch 1).

    python benchmarks/transitions.py [--shape 8,128,128,4096] [--repeats 5] [--json out.json]

Prints the machine (``lscpu``), the float32 GEMM ceiling measured in the same run, and per kind: chunked
prefill tokens/s and achieved FLOP/s (XLA's count of the compiled program) against the ceiling, its cost per
token against the scalar kind's, the training step (forward + backward through every input) and the O(1)
decode step. The same as ``ssdkit bench --scan``. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys


def machine() -> str:
    """``lscpu``'s model name, cores and the widest vector ISA it lists."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no lscpu)"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, {isa}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8,128,128,4096", help="H,P,N,T")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax

    from ssdkit.models.bench import run_scan, scan_table

    shape = tuple(int(v) for v in args.shape.split(","))
    print(f"machine: {machine()}; JAX {jax.__version__} on {jax.default_backend()}", file=sys.stderr)
    ceilings, results = run_scan(shape, args.batch, args.repeats)
    print(f"float32 GEMM ceiling: {ceilings[0].gemm_flops / 1e9:.1f} GFLOP/s (median), "
          f"{ceilings[0].gemm_flops_best / 1e9:.1f} best")
    print(scan_table(ceilings[0], results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "jax": jax.__version__, "shape": shape,
                       "ceiling": dataclasses.asdict(ceilings[0]),
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

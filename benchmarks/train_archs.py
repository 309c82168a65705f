"""Same command, same data, same wall-clock budget: Mamba-2 against the toy recurrences (retention,
GLA) trained with ``ssdkit train --arch``, compared on held-out bits per byte.

    python benchmarks/train_archs.py [--minutes 8] [--config configs/mamba2-stdlib-bytes.toml] [--out runs/archs]

For each architecture: a probe run of ``--probe-steps`` measures the seconds per step (after
compilation), then a full run gets ``steps = budget / (seconds per step)`` with the config's schedule
(warmup, cosine decay to ``min_lr_ratio``) scaled to that many steps, and the held-out figure is taken
over every held-out row at the end. Nothing else should run meanwhile: the budget is wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ssdkit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ssdkit.models.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _params(run: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(run / "model" / "model.safetensors"), "np") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--config", default="configs/mamba2-stdlib-bytes.toml")
    ap.add_argument("--archs", default="mamba2,retention,gla")
    ap.add_argument("--probe-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/archs"))
    ap.add_argument("--eval-rows", type=int, default=1000000,
                    help="held-out rows for the final figure (default: every one; the same rows for every arch)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import tomllib

    base = tomllib.loads((ROOT / args.config).read_text())
    rows = []
    for arch in args.archs.split(","):
        probe = args.out / f"{arch}-probe"
        _ssdkit("train", "--config", args.config, "--arch", arch, "--out", str(probe), "--steps",
                str(args.probe_steps), "--eval-every", "100000", "--save-every", "100000", "--no-progress")
        log = _log(probe)
        per_step = (log[-1]["seconds"] - log[4]["seconds"]) / (len(log) - 5)
        steps = max(10, int(args.minutes * 60 / per_step))
        run = args.out / arch
        t = time.perf_counter()
        _ssdkit("train", "--config", args.config, "--arch", arch, "--out", str(run), "--steps", str(steps),
                "--warmup-steps", str(max(1, round(base.get("warmup_steps", 20) * steps / base["steps"]))),
                "--eval-every", str(steps), "--eval-rows", str(args.eval_rows), "--save-every", str(steps),
                "--no-progress")
        wall = time.perf_counter() - t
        final = _log(run)[-1]
        rows.append({"arch": arch, "params": _params(run), "seconds_per_step": per_step, "steps": steps,
                     "tokens": final["tokens"], "train_seconds": final["seconds"], "wall_seconds": wall,
                     "held_out_bits_per_byte": final["held_out_bits_per_byte"]})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| model | parameters | s/step | steps | tokens | held-out bits/byte |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['params'] / 1e6:.2f}M | {r['seconds_per_step']:.2f} | {r['steps']} | "
              f"{r['tokens'] / 1e6:.2f}M | {r['held_out_bits_per_byte']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

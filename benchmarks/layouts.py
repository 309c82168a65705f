"""Decode speed of the documented API from either weight layout, side by side in one process.

``mamba2.generate`` and ``mamba2.generate_stream`` with per-layer params (the default of ``init_params`` and
``load_checkpoint``) and with stacked ones (``stacked=True``), which the generation loops split per call
inside the compiled program (``Mamba2LM.prepare``). Alternating rounds; each figure is the best of the
rounds' per-step times (prefill excluded: a generate of 1 token is subtracted).

    python benchmarks/layouts.py --model 130m --steps 64 --rounds 5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit.models import mamba2
from ssdkit.models.bench import load_params


def _generate_seconds(params, cfg, prompt, steps: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(mamba2.generate(params, cfg, prompt, max_new_tokens=steps).tokens)
    return time.perf_counter() - start


def _stream_seconds(params, cfg, prompt, steps: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(list(mamba2.generate_stream(params, cfg, prompt, max_new_tokens=steps)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="130m", help="a preset (random weights, seed 0) or a checkpoint folder")
    parser.add_argument("--steps", type=int, default=64, help="tokens generated per call")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (best of)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()

    per_layer, cfg = load_params(args.model, jnp.float32)
    stacked, _ = load_params(args.model, jnp.float32, stacked=True)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_len)),
                         jnp.int32)
    layouts = {"per layer": per_layer, "stacked": stacked}
    calls = {"generate": _generate_seconds, "generate_stream": _stream_seconds}
    for params in layouts.values():  # compile everything first
        for call in calls.values():
            call(params, cfg, prompt, args.steps)
            call(params, cfg, prompt, 1)
    best = {(c, n): np.inf for c in calls for n in layouts}
    for _ in range(args.rounds):
        for c, call in calls.items():
            for n, params in layouts.items():
                per_step = (call(params, cfg, prompt, args.steps) - call(params, cfg, prompt, 1)) / (args.steps - 1)
                best[c, n] = min(best[c, n], per_step)
    print(f"{args.model} float32, batch {args.batch}, {args.steps} steps, best of {args.rounds} alternating rounds "
          f"({jax.devices()[0].device_kind})")
    print("| call | per layer (ms/step) | stacked (ms/step) | stacked / per layer |")
    print("|---|---|---|---|")
    for c in calls:
        a, b = best[c, "per layer"] * 1e3, best[c, "stacked"] * 1e3
        print(f"| `mamba2.{c}` | {a:.2f} | {b:.2f} | {b / a:.3f} |")


if __name__ == "__main__":
    main()

"""Multi-query associative recall (MQAR) at one layer, the same budget for every architecture: Mamba-2 (the
configuration of tests/test_mqar.py) against every shipped mixer (``ssdkit.models.archs.MIXERS``).

    python benchmarks/mqar_archs.py [--steps 1000] [--seeds 0,1] [--archs mamba2,gla,...] [--json out.json]

Each model: one layer, d_model 64, trained by ``ssdkit.models.tasks.mqar.train_on_mqar`` (AdamW 1e-2, 20
warm-up steps, cosine, a fresh batch of 32 rows each step) for the same number of steps; the held-out query
accuracy is over 512 rows (2,048 answers; chance 1/16). The mixers share one shape: 4 heads of 32 value
channels, 32 key channels per head (one group per head), chunks of 16, convs of 4 taps. Accuracy, not
speed, is the figure: the seconds are for orientation only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--archs", default=None, help="comma-separated; default mamba2 and every shipped mixer")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    import ssdkit
    from ssdkit.models import archs, mamba2
    from ssdkit.models.tasks.mqar import TASK, mqar_vocab_size, train_on_mqar

    vocab = mqar_vocab_size(TASK["key_vocab"], TASK["value_vocab"])
    names = args.archs.split(",") if args.archs else ["mamba2", *archs.MIXERS]
    rows = []
    for name in names:
        for seed in (int(s) for s in args.seeds.split(",")):
            if name == "mamba2":  # tests/test_mqar.py's configuration
                cfg = mamba2.Mamba2Config(d_model=64, n_layer=1, vocab_size=vocab, d_state=32, headdim=8,
                                          chunk_size=16, A_init_range=(1.0, 2.0))
                params = mamba2.init_params(cfg, jax.random.key(seed))
                loss_fn = lambda p, b, cfg=cfg: mamba2.loss(p, cfg, b[0], loss_mask=b[1])  # noqa: E731
            else:
                lm = ssdkit.MixerLM(ssdkit.LMConfig(vocab_size=vocab, d_model=64, n_layer=1, num_heads=4,
                                                    head_dim=32, state_dim=32, num_groups=4, chunk_size=16,
                                                    conv_kernel=4), archs.mixer(name))
                params = lm.init(jax.random.key(seed))
                loss_fn = lambda p, b, lm=lm: lm.loss(p, b[0], loss_mask=b[1])  # noqa: E731
            n_params = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(params))
            t = time.perf_counter()
            _, last, held = train_on_mqar(loss_fn, params, steps=args.steps, seed=seed)
            row = {"arch": name, "seed": seed, "params": n_params, "steps": args.steps,
                   "held_out_accuracy": float(held.accuracy), "held_out_loss": float(held.loss),
                   "last_train_loss": float(last.loss), "seconds": time.perf_counter() - t}
            rows.append(row)
            print(f"[mqar] {name} seed {seed}: accuracy {row['held_out_accuracy']:.4f} "
                  f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print("| arch | params | steps | held-out query accuracy (per seed) |")
    print("|---|---|---|---|")
    for name in names:
        mine = [r for r in rows if r["arch"] == name]
        accs = ", ".join(f"{r['held_out_accuracy']:.1%}" for r in mine)
        print(f"| {name} | {mine[0]['params']:,} | {args.steps} | {accs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

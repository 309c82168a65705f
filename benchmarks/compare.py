"""Side by side: ssdkit against transformers' Mamba2ForCausalLM (torch, CPU) on the same model.

Both run the same random-initialised preset (or checkpoint directory) in float32, batch 1. Runs
alternate between the implementations (ssdkit, torch, ssdkit, torch, ...) so that machine drift hits
both alike, and the report gives medians and the ratio measured in this one run.

    python benchmarks/compare.py --model 130m --prefill-lengths 128,512,2048 --decode-steps 32 --rounds 3

Other peers (mamba2-jax, llama.cpp's llama-bench) are not wired in yet; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from models import mamba2


def _torch_model(params, cfg, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        mamba2.save_checkpoint(params, cfg, d)
        model = transformers.Mamba2ForCausalLM.from_pretrained(d).eval()
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="130m")
    ap.add_argument("--prefill-lengths", default="128,512,2048")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (match the machine's cores)")
    args = ap.parse_args()

    import torch

    params, cfg = __import__("models.bench", fromlist=["load_params"]).load_params(args.model, jnp.float32)
    tmodel = _torch_model(params, cfg, args.threads)
    decode_params = mamba2.unstack_layers(params)
    lengths = [int(v) for v in args.prefill_lengths.split(",")]
    rows = []

    for seq in lengths:
        tokens = np.random.default_rng(seq).integers(1, cfg.vocab_size, (1, seq)).astype(np.int32)
        jt = jnp.asarray(tokens)
        tt = torch.as_tensor(tokens, dtype=torch.long)
        jax.block_until_ready(mamba2.prefill(params, cfg, jt))  # compile
        ours, theirs = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            jax.block_until_ready(mamba2.prefill(params, cfg, jt))
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                tmodel(tt, logits_to_keep=1)
            theirs.append(time.perf_counter() - t)
        rows.append((f"prefill {seq}", seq / statistics.median(ours), seq / statistics.median(theirs)))
        print(f"prefill {seq}: ssdkit {rows[-1][1]:.1f} tok/s, transformers {rows[-1][2]:.1f} tok/s", flush=True)

    n = args.decode_steps
    prompt = np.random.default_rng(0).integers(1, cfg.vocab_size, (1, 8)).astype(np.int32)
    model = mamba2.Mamba2LM(cfg)

    def ours_gen(k):
        out = ssdkit.generate(model, decode_params, jnp.asarray(prompt), max_new_tokens=k)
        return jax.block_until_ready(out.tokens)

    ours_gen(n + 1)
    ours_gen(1)
    ours, theirs = [], []
    tp = torch.as_tensor(prompt, dtype=torch.long)
    for _ in range(args.rounds):
        t = time.perf_counter()
        ours_gen(n + 1)
        long = time.perf_counter() - t
        t = time.perf_counter()
        ours_gen(1)
        ours.append((long - (time.perf_counter() - t)) / n)
        with torch.no_grad():
            t = time.perf_counter()
            tmodel.generate(tp, attention_mask=torch.ones_like(tp), max_new_tokens=n + 1, min_new_tokens=n + 1,
                            do_sample=False, pad_token_id=0)
            long = time.perf_counter() - t
            t = time.perf_counter()
            tmodel.generate(tp, attention_mask=torch.ones_like(tp), max_new_tokens=1, do_sample=False, pad_token_id=0)
            theirs.append((long - (time.perf_counter() - t)) / n)
    rows.append(("decode b=1", 1 / statistics.median(ours), 1 / statistics.median(theirs)))
    print(f"decode: ssdkit {rows[-1][1]:.1f} tok/s, transformers {rows[-1][2]:.1f} tok/s", flush=True)

    print("\n| workload (float32, batch 1) | ssdkit tokens/s | transformers tokens/s | ratio |\n|---|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()

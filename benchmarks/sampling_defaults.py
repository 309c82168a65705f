"""Which sampling settings keep a model out of loops: many seeded samples per setting, counted.

    python benchmarks/sampling_defaults.py [--model default|DIR] [--samples 32] [--new-tokens 200]

For each setting (temperature, top-p, repetition and presence penalties; greedy first), draws
``--samples`` continuations of ``--new-tokens`` tokens for each prompt (a new file from its start, and
README's prompt) in one batch per prompt, and counts:

* **char run**: a sample holding a run of more than 20 identical characters (the test on the shipped model
  asks for none);
* **line loop**: a sample in which the same non-blank line comes 3 times in a row;
* **distinct 4-grams**: distinct token 4-grams over all 4-grams of the samples (1.0: nothing repeated);
* **bits/byte at T=1**: the model's own code length of the samples at temperature 1 (how plausible the model
  finds what it wrote: cooler settings write likelier text, until they loop).

The shipped model's defaults (``configs/<name>.sampling.json``) are the setting with no line loop in any
sample and the fewest char runs, the coolest among equals. (No sampled setting of the second edition was free
of char runs: they are reStructuredText underlines, ``=====`` and ``-----`` under a docstring's headings,
which real code has; penalties that remove them break the code's own repetition.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ("", "def fibonacci(n):")
SETTINGS = (  # (temperature, top_p, repetition penalty, presence penalty)
    (0.0, None, 1.0, 0.0),
    (0.0, None, 1.2, 0.0),
    (0.6, 0.95, 1.0, 0.0),
    (0.6, 0.95, 1.1, 0.0),
    (0.7, 0.95, 1.0, 0.0),
    (0.7, 0.95, 1.1, 0.0),
    (0.7, 0.95, 1.0, 0.5),
    (0.8, 0.95, 1.0, 0.0),
    (0.8, 0.95, 1.1, 0.0),
    (1.0, 0.95, 1.0, 0.0),
)


@dataclasses.dataclass(frozen=True)
class Counted:
    temperature: float
    top_p: float | None
    repetition_penalty: float
    presence_penalty: float
    samples: int
    char_runs: int
    line_loops: int
    distinct_4grams: float
    bits_per_byte_t1: float


def longest_char_run(s: str) -> int:
    return max((len(m.group(0)) for m in re.finditer(r"(.)\1*", s, re.DOTALL)), default=0)


def line_loop(s: str, times: int = 3) -> bool:
    lines = s.split("\n")
    return any(lines[i].strip() and all(lines[i + k] == lines[i] for k in range(1, times))
               for i in range(len(lines) - times + 1))


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ssdkit
    from ssdkit.models import mamba2, text
    from ssdkit.models.cli import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    params, cfg, path, _ = load_model(args.model, "float32", 0)
    tok = mamba2.load_tokenizer(path)
    eod = text.eod_id(tok)
    model = mamba2.Mamba2LM(cfg)
    rows = []
    for temperature, top_p, rep, presence in SETTINGS:
        sampler = ssdkit.make_sampler(temperature, None, top_p)
        penalties = ssdkit.Penalties(rep, presence)
        texts, ids_all, nll, n_bytes = [], [], 0.0, 0
        for p_i, prompt in enumerate(PROMPTS):
            prompt_ids = text.encode(tok, prompt)
            batch = 1 if temperature == 0 else args.samples  # greedy: one sample is all samples
            ids = jnp.asarray(np.repeat(prompt_ids[None], batch, 0))
            out = ssdkit.generate(model, params, ids, max_new_tokens=args.new_tokens, sampler=sampler,
                                  penalties=penalties if penalties.active else None, eos_token_id=eod,
                                  key=jax.random.key(p_i))
            toks = np.asarray(out.tokens)
            lengths = np.asarray(out.lengths)
            full = jnp.concatenate([ids, out.tokens], axis=1)
            logp = jax.nn.log_softmax(mamba2.forward(params, cfg, full)[:, ids.shape[1] - 1: -1], axis=-1)
            picked = np.asarray(jnp.take_along_axis(logp, out.tokens[..., None], axis=-1)[..., 0])
            for b in range(batch):
                t = toks[b, : lengths[b]].tolist()
                s = tok.decode(t)
                reps = args.samples if temperature == 0 else 1
                texts += [s] * reps
                ids_all += [t] * reps
                nll -= reps * float(picked[b, : lengths[b]].sum())
                n_bytes += reps * max(len(s.encode()), 1)
        grams = [tuple(t[i:i + 4]) for t in ids_all for i in range(len(t) - 3)]
        row = Counted(temperature, top_p, rep, presence, len(texts),
                      sum(longest_char_run(s) > 20 for s in texts), sum(line_loop(s) for s in texts),
                      len(set(grams)) / max(len(grams), 1), nll / math.log(2) / n_bytes)
        rows.append(row)
        print(row, flush=True)
    print("\n| temperature | top-p | repetition | presence | samples | char run > 20 | line loop | distinct 4-grams "
          "| bits/byte at T=1 |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.temperature:g} | {r.top_p or '-'} | {r.repetition_penalty:g} | {r.presence_penalty:g} | "
              f"{r.samples} | {r.char_runs} | {r.line_loops} | {r.distinct_4grams:.3f} | {r.bits_per_byte_t1:.3f} |")
    clean = [r for r in rows if r.temperature > 0 and r.line_loops == 0]
    if clean:
        best = min(clean, key=lambda r: (r.char_runs, r.temperature, r.repetition_penalty, r.presence_penalty))
        print(f"\nno line loop, the fewest char runs, the coolest: {best}")
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn a finished ``ssdkit train`` run into the shipped model (``models/pretrained/<name>/``).

    python scripts/ship_pretrained.py RUN_DIR [--name mamba2-stdlib-bytes]

Copies the run's exported model (config.json, model.safetensors, tokenizer.json, training.json) and its
loss curve, then measures and records in ``evaluation.json``:

* held-out bits per byte over every held-out file (``ssdkit.models.evaluation``), next to ``xz -9e`` and
  ``gzip -9`` on the same files (each file compressed alone);
* the same figure on a fixed sample of small held-out files, with their sha256, which the tests recompute;
* greedy completions of a few prompts, with their token ids, and sampled ones (README's settings).

The run's command and log summary go to ``README.md`` beside the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS = ("def fibonacci(n):", "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n",
           "import os\n\n\ndef list_python_files(folder):\n", "    def __repr__(self):")
SAMPLE_FILES = 3  # the smallest held-out files of at least 2 KB
NEW_TOKENS = 200
TEMPERATURE, TOP_P, SEED = 0.8, 0.95, 1  # README's main command samples with these


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from compression import compressed_bits

    from ssdkit.models import corpus, evaluation, mamba2, text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", default=mamba2.pretrained.DEFAULT)
    args = ap.parse_args(argv)

    dest = ROOT / "models" / "pretrained" / args.name
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        shutil.copyfile(args.run / "model" / f, dest / f)
    if (args.run / "loss.png").exists():
        shutil.copyfile(args.run / "loss.png", dest / "loss.png")

    shipped = mamba2.load_pretrained(args.name)
    record = json.loads((dest / "training.json").read_text())
    stdlib = corpus.python_stdlib(record["run"]["held_out"])
    assert stdlib.manifest().files_sha256 == record["corpus"]["files_sha256"], "another standard library"
    files = stdlib.paths("held-out")
    docs = evaluation.read_documents(files, shipped.tokenizer)
    full = evaluation.evaluate(shipped.params, shipped.cfg, docs, window=2048, batch=8)
    n_bytes = sum(f.stat().st_size for f in files)
    comp = {k: v / n_bytes for k, v in compressed_bits(files).items()}

    small = sorted((f for f in files if f.stat().st_size >= 2048), key=lambda f: f.stat().st_size)[:SAMPLE_FILES]
    sample = evaluation.evaluate(shipped.params, shipped.cfg, evaluation.read_documents(small, shipped.tokenizer),
                                 window=2048, batch=1)

    completions = []
    for prompt in PROMPTS:
        ids = jnp.asarray(text.encode(shipped.tokenizer, prompt)[None])
        out = mamba2.generate(shipped.params, shipped.cfg, ids, max_new_tokens=NEW_TOKENS, key=jax.random.key(0),
                              eos_token_id=text.eod_id(shipped.tokenizer))
        tokens = np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()
        completions.append({"prompt": prompt, "tokens": tokens, "text": shipped.tokenizer.decode(tokens)})
    sampled = []  # greedy decoding of a model this small falls into loops (runs of spaces, repeated phrases)
    for prompt in PROMPTS:
        ids = jnp.asarray(text.encode(shipped.tokenizer, prompt)[None])
        out = mamba2.generate(shipped.params, shipped.cfg, ids, max_new_tokens=NEW_TOKENS, key=jax.random.key(SEED),
                              temperature=TEMPERATURE, top_p=TOP_P, eos_token_id=text.eod_id(shipped.tokenizer))
        tokens = np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()
        sampled.append({"prompt": prompt, "temperature": TEMPERATURE, "top_p": TOP_P, "seed": SEED,
                        "text": shipped.tokenizer.decode(tokens)})

    evaluation_record = {
        "held_out": {"files": len(files), "bytes": n_bytes, "tokens": full.tokens,
                     "bits_per_byte": full.bits_per_byte, "cross_entropy": full.cross_entropy,
                     **{f"{k} bits_per_byte": v for k, v in comp.items()}},
        "sample": {"files": [{"path": f.relative_to(stdlib.root).as_posix(),
                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in small],
                   "bits_per_byte": sample.bits_per_byte, "nll": sample.nll, "tokens": sample.tokens},
        "greedy": completions,
        "sampled": sampled,
    }
    (dest / "evaluation.json").write_text(json.dumps(evaluation_record, indent=2, ensure_ascii=False) + "\n")
    (dest / "README.md").write_text(model_card(args.name, record, evaluation_record, args.run, shipped))
    print(json.dumps(evaluation_record["held_out"], indent=2))
    for c in completions:
        print("-" * 60 + "\n" + c["prompt"] + c["text"])
    return 0


def model_card(name: str, record: dict, ev: dict, run: Path, shipped) -> str:
    """README.md beside the weights: what it is, how it was made (command, corpus, log summary), what
    it measures, sample completions."""
    import math

    import jax

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = {}
    for e in log:
        last[e["step"]] = e
    final = last[max(last)]
    evals = [e for e in last.values() if "held_out_bits_per_byte" in e]
    n_params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shipped.params))
    c, r, h = record["corpus"], record["run"], ev["held_out"]
    lines = [
        f"# {name}", "",
        f"A byte-level Mamba-2 ({n_params / 1e6:.2f}M parameters: d_model {shipped.cfg.d_model}, "
        f"{shipped.cfg.n_layer} layers, {shipped.cfg.nheads} heads of {shipped.cfg.headdim}, d_state "
        f"{shipped.cfg.d_state}; vocabulary 256 bytes + `<|endoftext|>` = 256, padded to "
        f"{shipped.cfg.padded_vocab_size}) trained with `ssdkit train` on the Python standard library's own "
        f"sources. Loaded by `ssdkit.models.mamba2.load_pretrained()`; the default of `ssdkit generate` and "
        f"`ssdkit eval`.",
        "", "## How it was made", "",
        "```bash", "ssdkit train --config configs/mamba2-stdlib-bytes.toml", "python scripts/ship_pretrained.py "
        "runs/mamba2-stdlib-bytes", "```", "",
        f"Corpus `{c['name']}` of Python {c['python_version']}: {c['train_files']} training files "
        f"({c['train_bytes']:,} bytes), {c['held_out_files']} held-out files ({c['held_out_bytes']:,} bytes, "
        f"{c['held_out_bytes'] / (c['held_out_bytes'] + c['train_bytes']):.1%}), split by sha256 of each "
        f"file's relative path (< {c['held_out_fraction']} held out); file list sha256 `{c['files_sha256']}`. "
        f"Another Python version has slightly different files.", "",
        f"Training: {final['step']} steps of {r['batch_size']} × {r['seq_len']} tokens = {final['tokens']:,} "
        f"tokens in {final['seconds'] / 60:.1f} minutes (JAX {record['jax']}, CPU; "
        f"{final['tokens'] / final['seconds']:,.0f} tokens/s), AdamW lr {r['lr']} (warmup {r['warmup_steps']}, "
        f"cosine to {r['min_lr_ratio']}×), weight "
        f"decay {r['weight_decay']}, clip {r['clip_norm']}, remat `{r['remat']}`. Final training loss "
        f"{final['loss']:.4f} nats per token (a token is a byte); held-out bits per byte during training (first "
        f"{r['eval_rows']} rows of {r['seq_len']} tokens):", "",
        "| step | tokens | held-out bits/byte |", "|---|---|---|",
        *[f"| {e['step']} | {e['tokens']:,} | {e['held_out_bits_per_byte']:.4f} |" for e in evals], "",
        "![loss curve](loss.png)", "",
        "## Held-out bits per byte", "",
        f"Every held-out file ({h['files']} files, {h['bytes']:,} bytes), each file on its own:", "",
        "| method | bits per byte |", "|---|---|",
        f"| this model (`ssdkit eval`) | {h['bits_per_byte']:.4f} |",
        f"| xz -9e | {h['xz -9e bits_per_byte']:.4f} |", f"| gzip -9 | {h['gzip -9 bits_per_byte']:.4f} |", "",
        "## Completions", "",
    ]
    lines += [f"Sampled (`--temperature {TEMPERATURE} --top-p {TOP_P} --seed {SEED}`, as README's main command):", ""]
    for g in ev["sampled"]:
        lines += ["```python", g["prompt"] + g["text"], "```", ""]
    lines += ["Greedy (`--temperature 0`): a model this small falls into loops — runs of spaces after a newline, "
              "repeated phrases:", ""]
    for g in ev["greedy"]:
        lines += ["```python", g["prompt"] + g["text"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Turn a finished ``ssdkit train`` run into the shipped model (``models/pretrained/<name>/``).

    python scripts/ship_pretrained.py RUN_DIR [--name NAME] [--config configs/NAME.toml]

Copies the run's exported model (config.json, model.safetensors, tokenizer.json, training.json) and its
loss curve, writes its sampling defaults (``generation_config.json``: :data:`SAMPLING`, the settings
``ssdkit generate`` and ``ssdkit serve`` use when none are given), then measures and records in
``evaluation.json``:

* held-out bits per byte over every held-out file of the standard library (``python-stdlib:held-out``) and,
  for a model trained on ``python-code``, of the held-out installed packages (``python-packages:held-out``:
  other authors, never trained on), each next to ``xz -9e`` and ``gzip -9`` on the same files (each file
  compressed alone);
* the same figure on a fixed sample of small held-out files, with their sha256, which the tests recompute;
* greedy completions of a few prompts, with their token ids, and sampled ones (the sampling defaults);
* ``ssdkit generate`` with no flag at all (a new document from its start, seed 0).

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
SEED = 1  # README's main command


def _sampling(name: str):
    """The shipped model's sampling defaults, chosen by measurement (``benchmarks/sampling_defaults.py``)."""
    from ssdkit.models.generation_config import GenerationDefaults

    return GenerationDefaults(**json.loads((ROOT / "configs" / f"{name}.sampling.json").read_text()))


def _held_out(shipped, files) -> dict:
    """Bits per byte of ``files`` (each whole) next to xz -9e and gzip -9 on each file alone."""
    from compression import compressed_bits

    from ssdkit.models import evaluation

    result = evaluation.evaluate(shipped.params, shipped.cfg, evaluation.read_documents(files, shipped.tokenizer),
                                 window=2048, batch=8)
    n_bytes = sum(f.stat().st_size for f in files)
    assert result.num_bytes == n_bytes
    comp = {k: v / n_bytes for k, v in compressed_bits(files).items()}
    return {"files": len(files), "bytes": n_bytes, "tokens": result.tokens, "bits_per_byte": result.bits_per_byte,
            "cross_entropy": result.cross_entropy, **{f"{k} bits_per_byte": v for k, v in comp.items()}}


def _complete(shipped, prompt: str, sampler, penalties, seed: int) -> list[int]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import ssdkit
    from ssdkit.models import mamba2, text

    ids = jnp.asarray(text.encode(shipped.tokenizer, prompt)[None])
    out = ssdkit.generate(mamba2.Mamba2LM(shipped.cfg), shipped.params, ids, max_new_tokens=NEW_TOKENS,
                          sampler=sampler, penalties=penalties if penalties.active else None,
                          key=jax.random.key(seed), eos_token_id=text.eod_id(shipped.tokenizer))
    return np.asarray(out.tokens[0, : int(out.lengths[0])]).tolist()


def main(argv=None) -> int:
    import ssdkit
    from ssdkit.models import corpus, evaluation, mamba2

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
    defaults = _sampling(args.name)
    (dest / "generation_config.json").write_text(json.dumps(defaults.to_json(), indent=2) + "\n")

    shipped = mamba2.load_pretrained(args.name)
    record = json.loads((dest / "training.json").read_text())
    stdlib = corpus.python_stdlib(record["run"]["held_out"])
    named, _ = corpus.resolve(record["run"]["data"], record["run"]["held_out"])
    assert named.manifest().files_sha256 == record["corpus"]["files_sha256"], "another corpus than the run's"
    files = stdlib.paths("held-out")
    held = {"python-stdlib": _held_out(shipped, files)}
    if record["run"]["data"] == "python-code":
        packages = corpus.python_packages()
        held["python-packages"] = {**_held_out(shipped, packages.paths("held-out")),
                                   "packages": list(packages.held_out_packages)}

    small = sorted((f for f in files if f.stat().st_size >= 2048), key=lambda f: f.stat().st_size)[:SAMPLE_FILES]
    sample = evaluation.evaluate(shipped.params, shipped.cfg, evaluation.read_documents(small, shipped.tokenizer),
                                 window=2048, batch=1)

    greedy = [{"prompt": p, "tokens": (t := _complete(shipped, p, ssdkit.Greedy(), ssdkit.Penalties(), 0)),
               "text": shipped.tokenizer.decode(t)} for p in PROMPTS]
    sampler = ssdkit.make_sampler(defaults.temperature, defaults.top_k, defaults.top_p, defaults.min_p)
    penalties = ssdkit.Penalties(defaults.repetition_penalty, defaults.presence_penalty, defaults.frequency_penalty)
    sampled = [{"prompt": p, "seed": SEED, "text": shipped.tokenizer.decode(
        _complete(shipped, p, sampler, penalties, SEED))} for p in PROMPTS]
    fresh = shipped.tokenizer.decode(_complete(shipped, "", sampler, penalties, 0))  # `ssdkit generate`, no flags

    evaluation_record = {
        "held_out": held,
        "sample": {"files": [{"path": f.relative_to(stdlib.root).as_posix(),
                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in small],
                   "bits_per_byte": sample.bits_per_byte, "nll": sample.nll, "tokens": sample.tokens},
        "sampling": defaults.to_json(),
        "greedy": greedy,
        "sampled": sampled,
        "no_flags": fresh,
    }
    (dest / "evaluation.json").write_text(json.dumps(evaluation_record, indent=2, ensure_ascii=False) + "\n")
    (dest / "README.md").write_text(model_card(args.name, record, evaluation_record, args.run, shipped, defaults))
    print(json.dumps(evaluation_record["held_out"], indent=2))
    for c in sampled:
        print("-" * 60 + "\n" + c["prompt"] + c["text"])
    print("-" * 60 + "\n" + fresh)
    return 0


def model_card(name: str, record: dict, ev: dict, run: Path, shipped, defaults) -> str:
    """README.md beside the weights: what it is, how it was made (command, corpus, log summary), what
    it measures, sample completions."""
    import math

    import jax

    from ssdkit.models import text

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = {}
    for e in log:
        last[e["step"]] = e
    final = last[max(last)]
    evals = [e for e in last.values() if "held_out_bits_per_byte" in e]
    n_params = sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(shipped.params))
    c, r = record["corpus"], record["run"]
    vocab = text.vocab_size(text.byte_level(shipped.tokenizer))
    if vocab == 257:
        tokens = "vocabulary 256 bytes + `<|endoftext|>` = 256"
        per_token = "a token is a byte"
    else:
        tokens = (f"a byte-level BPE of {vocab} ids learnt from the training split by `ssdkit train --tokenizer "
                  f"bpe:{vocab}`: ids 0..255 the bytes, 256 `<|endoftext|>`, then the merges")
        per_token = "a token is a BPE token"
    data = {"python-stdlib": "the Python standard library's own sources",
            "python-code": "the Python standard library's sources and those of the third-party packages "
                           "installed beside ssdkit (`python-code` = `python-stdlib` + `python-packages`)"}[c["name"]]
    lines = [
        f"# {name}", "",
        f"A Mamba-2 ({n_params / 1e6:.2f}M parameters: d_model {shipped.cfg.d_model}, "
        f"{shipped.cfg.n_layer} layers, {shipped.cfg.nheads} heads of {shipped.cfg.headdim}, d_state "
        f"{shipped.cfg.d_state}; {tokens}, padded to {shipped.cfg.padded_vocab_size}) trained with "
        f"`ssdkit train` on {data}. Loaded by `ssdkit.models.mamba2.load_pretrained()`; the default of "
        f"`ssdkit generate`, `ssdkit eval` and `ssdkit serve`.",
        "", "## How it was made", "",
        "```bash", f"ssdkit train --config configs/{name}.toml", f"python scripts/ship_pretrained.py {r['out']}",
        "```", "",
        f"Corpus `{c['name']}` of Python {c['python_version']}: {c['train_files']} training files "
        f"({c['train_bytes']:,} bytes), {c['held_out_files']} held-out files ({c['held_out_bytes']:,} bytes); "
        f"file list sha256 `{c['files_sha256']}` (`ssdkit.models.corpus`: the standard library split by a hash "
        f"of each file's path, {c['held_out_fraction']} held out; installed packages held out whole by a hash of "
        f"their name). Another Python version or set of installed packages has other files.", "",
        f"Training: {final['step']} steps of {r['batch_size']} × {r['seq_len']} tokens = {final['tokens']:,} "
        f"tokens in {final['seconds'] / 60:.1f} minutes (JAX {record['jax']}, CPU; "
        f"{final['tokens'] / final['seconds']:,.0f} tokens/s), AdamW lr {r['lr']} (warmup {r['warmup_steps']}, "
        f"cosine to {r['min_lr_ratio']}×), weight decay {r['weight_decay']}, clip {r['clip_norm']}, remat "
        f"`{r['remat']}`. Final training loss {final['loss']:.4f} nats per token ({per_token}); held-out bits per "
        f"byte during training (first {r['eval_rows']} held-out rows of {r['seq_len']} tokens):", "",
        "| step | tokens | held-out bits/byte |", "|---|---|---|",
        *[f"| {e['step']} | {e['tokens']:,} | {e['held_out_bits_per_byte']:.4f} |" for e in evals], "",
        "![loss curve](loss.png)", "",
        "## Held-out bits per byte", "",
        "Every held-out file, each file whole and on its own (`ssdkit eval`; the compressors on each file alone):",
        "", "| held-out set | files | bytes | this model | xz -9e | gzip -9 |", "|---|---|---|---|---|---|",
    ]
    for set_name, h in ev["held_out"].items():
        lines.append(f"| `{set_name}:held-out` | {h['files']} | {h['bytes']:,} | **{h['bits_per_byte']:.4f}** | "
                     f"{h['xz -9e bits_per_byte']:.4f} | {h['gzip -9 bits_per_byte']:.4f} |")
    if "python-packages" in ev["held_out"]:
        lines += ["", "Held-out packages (never trained on): " + ", ".join(
            f"`{p}`" for p in ev["held_out"]["python-packages"]["packages"]) + "."]
    lines += ["", "## Sampling defaults", "",
              f"`generation_config.json`: {defaults.describe()}. `ssdkit generate` and `ssdkit serve` use these "
              "for every setting not given (a flag or a request field wins; `--temperature 0` is greedy).", "",
              "## Completions", "",
              "`ssdkit generate` with no flag at all (a new file from its start, seed 0, 200 tokens):", "",
              "```python", ev["no_flags"], "```", "",
              f"With the defaults (`--seed {SEED}`, as README's main command):", ""]
    for g in ev["sampled"]:
        lines += ["```python", g["prompt"] + g["text"], "```", ""]
    lines += ["Greedy (`--temperature 0`): a model this small falls into loops (repeated lines, runs of "
              "blank lines), which is why the defaults sample:", ""]
    for g in ev["greedy"]:
        lines += ["```python", g["prompt"] + g["text"], "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Plain against speculative greedy decoding, side by side in one run (tokens/s, acceptance, tokens per pass).

Three workloads:

* ``shipped`` — the shipped byte-level model completing held-out Python standard-library files (the
  corpus split the model was not trained on) from their first ``--prompt-tokens`` tokens; drafts from
  prompt lookup. Settings: plain, speculative with the adaptive draft length (the default), and a fixed
  draft of K tokens every round.
* ``deep`` — a draft model for a target several times its cost, on the same held-out files: the
  shipped model drafts for itself with ``--extra-layers`` more layers whose outputs are scaled by
  ``--epsilon`` (no larger byte-level model is trained; ε sets how often the two disagree).
* ``130m`` — Mamba-2 130M-shaped random weights (batch 1, a short random prompt). Random weights make
  no text, so drafts come from models whose agreement is known: the target's own first ``--skip-layers``
  layers and its head ("layer skip"), and the target itself ("self", every draft holds: the ceiling of
  the mechanism, a draft model as costly as the target).

With ``--gguf`` (the same weights converted by llama.cpp's ``convert_hf_to_gguf.py``; for ``130m``, what
``save_checkpoint`` writes for the seed-0 weights, see docs/benchmarks.md), the ``130m`` workload also times
llama.cpp in the same alternating rounds: plain decoding (``llama-bench`` ``tg``, ``--llama-bench``) and its
speculative decoding with the GGUF as its own draft (``llama-speculative-simple --spec-type draft-simple``,
``--llama-speculative``; the same ceiling as ssdkit's "self" row). Its figures are its own: the decode
rate it prints, and its drafts accepted.

Each row's time is one ``generate`` call of ``--new-tokens`` tokens minus one of a single token (the
prompt's prefill and the call overhead cancel), the best of ``--rounds`` rounds that alternate the
settings (on a shared VM the median still moves by 20% between identical programs; the best run is the
least disturbed one). Greedy outputs are compared with plain decoding's (they may part at a near tie). Speed
figures depend on the machine: read ``lscpu`` first, and run nothing else meanwhile.

    python benchmarks/speculative.py shipped --files 8 --new-tokens 256
    python benchmarks/speculative.py deep --files 6 --extra-layers 20 --epsilon 0.05
    python benchmarks/speculative.py 130m --new-tokens 64 --rounds 3
    python benchmarks/speculative.py 130m --new-tokens 256 --gguf 130m-f32.gguf \
        --llama-bench llama.cpp/build/bin/llama-bench \
        --llama-speculative llama.cpp/build/bin/llama-speculative-simple
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from ssdkit.models import corpus, mamba2

#: An outside implementation's sample: (seconds per new token, drafts accepted or None).
External = Callable[[], tuple[float, float | None]]


def _timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn().tokens)
    return time.perf_counter() - start


def _compare(model, params, prompt, settings: dict, new_tokens: int, rounds: int,
             external: dict[str, External] | None = None) -> dict:
    """For each named (speculative, draft_params) setting: decode seconds per token, stats, equality; then
    each ``external`` sampler's, timed in the same alternating rounds."""
    external = external or {}

    def call(setting, n):
        spec, draft_params = setting
        return ssdkit.generate(model, params, prompt, max_new_tokens=n, speculative=spec, draft_params=draft_params)

    plain = call((None, None), new_tokens)
    results = {name: {"times": []} for name in settings}
    for name, setting in settings.items():  # compile (and measure round costs) outside the timing
        res = call(setting, new_tokens)
        call(setting, 1)
        results[name]["result"] = res
    outside = {name: {"times": [], "acceptance": []} for name in external}
    for _ in range(rounds):
        for name, setting in settings.items():
            total = _timed(lambda s=setting: call(s, new_tokens))
            single = _timed(lambda s=setting: call(s, 1))
            results[name]["times"].append((total - single) / (new_tokens - 1))
        for name, sample in external.items():
            seconds, acceptance = sample()
            outside[name]["times"].append(seconds)
            outside[name]["acceptance"].append(acceptance)
    out = {}
    for name, r in results.items():
        res = r["result"]
        stats = res.speculation
        n = int(res.lengths[0])
        out[name] = dict(
            ms_per_token=1e3 * min(r["times"]),
            acceptance=None if stats is None else stats.acceptance_rate,
            tokens_per_pass=None if stats is None else (n - 1) / max(int(stats.passes), 1),
            same_as_plain=bool(np.array_equal(res.tokens, plain.tokens)),
            first_difference=None if np.array_equal(res.tokens, plain.tokens)
            else int(np.flatnonzero(np.asarray(res.tokens[0] != plain.tokens[0]))[0]),
        )
    for name, r in outside.items():
        best = int(np.argmin(r["times"]))
        out[name] = dict(ms_per_token=1e3 * r["times"][best], acceptance=r["acceptance"][best],
                         tokens_per_pass=None, same_as_plain=None, first_difference=None)
    return out


def llama_plain(bench: str, gguf: Path, new_tokens: int, threads: int) -> External:
    """llama.cpp's plain decoding: one ``llama-bench -p 0 -n new_tokens`` run (``compare.LlamaCpp``)."""
    from compare import LlamaCpp  # benchmarks/compare.py, beside this script

    run = LlamaCpp(bench, gguf, "gguf", threads, reps=1)
    return lambda: (run.decode_sampler(np.zeros((1, 0)), new_tokens)(), None)


def llama_speculative(binary: str, gguf: Path, new_tokens: int, draft_tokens: int, threads: int) -> External:
    """llama.cpp's speculative decoding, the GGUF drafting for itself (every draft holds, like ssdkit's
    "self" row): one greedy ``llama-speculative-simple`` run; its printed decode rate and acceptance."""
    cmd = [binary, "-m", str(gguf), "-md", str(gguf), "--spec-type", "draft-simple",
           "--spec-draft-n-max", str(draft_tokens), "--spec-draft-n-min", "0", "-n", str(new_tokens),
           "-t", str(threads), "-td", str(threads), "--temp", "0", "-c", str(2 * new_tokens + 256),
           "-p", "The quick brown fox jumps over the lazy dog"]

    def sample() -> tuple[float, float | None]:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")  # its text may split UTF-8
        text = proc.stdout + proc.stderr
        speed = re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+) t/s", text)
        accept = re.search(r"accept\s+=\s+([\d.]+)%", text)
        if proc.returncode != 0 or speed is None:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {text.strip()[-2000:]}")
        return 1.0 / float(speed.group(1)), None if accept is None else float(accept.group(1)) / 100

    return sample


def _print(title: str, rows: dict) -> None:
    base = rows["plain"]["ms_per_token"]
    print(f"\n{title}")
    print(f"{'setting':<24} {'ms/token':>9} {'tokens/s':>9} {'vs plain':>9} {'accepted':>9} {'tok/pass':>9}  same")
    for name, r in rows.items():
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        if r["same_as_plain"] is None:  # an outside implementation: its own text, no pass count
            tpp, same = "", ""
        else:
            tpp = "1.00" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}"
            same = "yes" if r["same_as_plain"] else f"to token {r['first_difference']}"
        print(f"{name:<24} {r['ms_per_token']:9.3f} {1e3 / r['ms_per_token']:9.1f} {base / r['ms_per_token']:8.2f}x "
              f"{acc:>9} {tpp:>9}  {same}")


def shipped(args) -> None:
    pre = mamba2.load_pretrained()
    model, params = mamba2.Mamba2LM(pre.cfg), mamba2.unstack_layers(pre.params)
    corp, part = corpus.resolve("python-stdlib:held-out")
    paths = [p for p in corp.paths(part) if p.stat().st_size > 4 * args.prompt_tokens][: args.files]
    k = args.draft_tokens
    settings = {
        "plain": (None, None),
        f"lookup, adaptive ≤{k}": (ssdkit.Speculative(draft_tokens=k), None),
        f"lookup, always {k}": (ssdkit.Speculative(draft_tokens=k, adaptive=False), None),
    }
    totals = {name: [] for name in settings}
    for path in paths:
        ids = pre.tokenizer.encode(path.read_text(errors="replace")).ids[: args.prompt_tokens]
        prompt = jnp.asarray([ids], jnp.int32)  # one prompt length: one compilation for every file
        rows = _compare(model, params, prompt, settings, args.new_tokens, args.rounds)
        _print(f"{path.name}: {prompt.shape[1]}-token prompt, {args.new_tokens} new tokens", rows)
        for name, r in rows.items():
            totals[name].append(r)
    _summary(totals)


def deep_target(args) -> None:
    """A draft model for a target several times its cost, on real text.

    No larger byte-level model is trained, so the target is built: the shipped model's 4 layers, then
    ``--extra-layers`` copies of them whose output projections are scaled by ``--epsilon``. Every extra
    layer is computed (the target costs about (4 + extra) / 4 times the draft's layers), but it changes
    the residual only by ε times a layer's output, so the shipped model, drafting, agrees with the
    target on most tokens: ε sets the acceptance.
    """
    pre = mamba2.load_pretrained()
    draft_cfg, draft_params = pre.cfg, mamba2.unstack_layers(pre.params)
    layers = tuple(draft_params.layers)
    extra = tuple(dataclasses.replace(layers[i % len(layers)],
                                      out_proj=layers[i % len(layers)].out_proj * args.epsilon)
                  for i in range(args.extra_layers))
    cfg = dataclasses.replace(draft_cfg, n_layer=len(layers) + len(extra))
    params = dataclasses.replace(draft_params, layers=layers + extra)
    model = mamba2.Mamba2LM(cfg)
    draft = ssdkit.DraftModel(mamba2.Mamba2LM(draft_cfg))
    k = args.draft_tokens
    settings = {
        "plain": (None, None),
        f"draft model, adaptive ≤{k}": (ssdkit.Speculative(draft, draft_tokens=k), draft_params),
        f"draft model, always {k}": (ssdkit.Speculative(draft, draft_tokens=k, adaptive=False), draft_params),
        f"lookup, adaptive ≤{k}": (ssdkit.Speculative(draft_tokens=k), None),
    }
    corp, part = corpus.resolve("python-stdlib:held-out")
    paths = [p for p in corp.paths(part) if p.stat().st_size > 4 * args.prompt_tokens][: args.files]
    totals = {name: [] for name in settings}
    for path in paths:
        ids = pre.tokenizer.encode(path.read_text(errors="replace")).ids[: args.prompt_tokens]
        rows = _compare(model, params, jnp.asarray([ids], jnp.int32), settings, args.new_tokens, args.rounds)
        _print(f"{path.name}: {cfg.n_layer}-layer target (ε = {args.epsilon}), {len(ids)}-token prompt, "
               f"{args.new_tokens} new tokens", rows)
        for name, r in rows.items():
            totals[name].append(r)
    _summary(totals)


def _summary(totals: dict) -> None:
    n = len(totals["plain"])
    print(f"\nover {n} files (geometric mean of the speed ratio, mean acceptance and tokens per pass):")
    for name, rs in totals.items():
        ratio = np.exp(np.mean([np.log(totals["plain"][i]["ms_per_token"] / r["ms_per_token"])
                                for i, r in enumerate(rs)]))
        acc = [r["acceptance"] for r in rs if r["acceptance"] is not None]
        tpp = [r["tokens_per_pass"] or 1.0 for r in rs]
        same = sum(r["same_as_plain"] for r in rs)
        print(f"  {name:<26} {ratio:.2f}x plain  accepted {np.mean(acc) if acc else 0:.0%}  "
              f"{np.mean(tpp):.2f} tokens/pass  identical to plain in {same}/{len(rs)}")


def shaped_130m(args) -> None:
    cfg = mamba2.Mamba2Config.preset("130m")
    params = jax.jit(mamba2.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params = mamba2.unstack_layers(params)
    skip_cfg = dataclasses.replace(cfg, n_layer=args.skip_layers)
    skip = dataclasses.replace(params, layers=params.layers[: args.skip_layers])
    model = mamba2.Mamba2LM(cfg)
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 64)), jnp.int32)
    k = args.draft_tokens
    settings = {
        "plain": (None, None),
        f"layer skip {args.skip_layers}, adaptive": (
            ssdkit.Speculative(ssdkit.DraftModel(mamba2.Mamba2LM(skip_cfg)), draft_tokens=k), skip),
        f"layer skip {args.skip_layers}, always {k}": (
            ssdkit.Speculative(ssdkit.DraftModel(mamba2.Mamba2LM(skip_cfg)), draft_tokens=k, adaptive=False), skip),
        f"self, always {k}": (ssdkit.Speculative(ssdkit.DraftModel(model), draft_tokens=k, adaptive=False), params),
        f"lookup, adaptive ≤{k}": (ssdkit.Speculative(draft_tokens=k), None),
    }
    external = {}
    if args.gguf:
        for path in (args.gguf, args.llama_bench, args.llama_speculative):
            if path is not None and not Path(path).is_file():
                raise SystemExit(f"no such file: {path}")
        if args.llama_bench:
            external["llama.cpp plain"] = llama_plain(args.llama_bench, Path(args.gguf), args.new_tokens, args.threads)
        if args.llama_speculative:
            external[f"llama.cpp self, {k}"] = llama_speculative(args.llama_speculative, Path(args.gguf),
                                                               args.new_tokens, k, args.threads)
    elif args.llama_bench or args.llama_speculative:
        raise SystemExit("--llama-bench / --llama-speculative need --gguf (the same weights as a GGUF file)")
    rows = _compare(model, params, prompt, settings, args.new_tokens, args.rounds, external)
    _print(f"Mamba-2 130M-shaped random weights, 64-token prompt, {args.new_tokens} new tokens", rows)
    pairs = [("plain", "plain", "llama.cpp plain"),
             ("self-drafting, every draft held", f"self, always {k}", f"llama.cpp self, {k}")]
    for what, ours, theirs in pairs:
        if theirs in rows:
            print(f"ssdkit ÷ llama.cpp, {what}: {rows[theirs]['ms_per_token'] / rows[ours]['ms_per_token']:.2f}x")
    if "llama.cpp plain" in rows and f"llama.cpp self, {k}" in rows:
        print(f"llama.cpp speculative vs its own plain: "
              f"{rows['llama.cpp plain']['ms_per_token'] / rows[f'llama.cpp self, {k}']['ms_per_token']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=("shipped", "deep", "130m"))
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--draft-tokens", type=int, default=8)
    parser.add_argument("--skip-layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--extra-layers", type=int, default=20, help="deep: layers added to the shipped model's 4")
    parser.add_argument("--epsilon", type=float, default=0.05, help="deep: scale of the extra layers' outputs")
    parser.add_argument("--gguf", help="130m: the same weights as a GGUF file, for the llama.cpp rows")
    parser.add_argument("--llama-bench", help="130m: llama.cpp's llama-bench binary (its plain decoding)")
    parser.add_argument("--llama-speculative", help="130m: llama.cpp's llama-speculative-simple binary")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (match the machine's cores)")
    args = parser.parse_args()
    if args.workload != "130m" and (args.gguf or args.llama_bench or args.llama_speculative):
        parser.error("the llama.cpp rows (--gguf, --llama-bench, --llama-speculative) are for the 130m workload")
    {"shipped": shipped, "deep": deep_target, "130m": shaped_130m}[args.workload](args)


if __name__ == "__main__":
    main()

"""Side by side: ssdkit against other Mamba-2 implementations on the same model, batch 1.

Peers (each optional: one that is not installed or not pointed to is skipped with a one-line message;
the ssdkit library itself never imports any of them):

* ``transformers`` — ``Mamba2ForCausalLM`` (torch, CPU, its plain-PyTorch path), loaded from the same
  weights; prefill with ``logits_to_keep=1``, decode with ``generate`` (greedy).
* ``mamba2-jax`` — the ``mamba2-jax`` package (Flax NNX), the same geometry with its own random init;
  prefill with its jitted ``forward`` (which computes logits at every position: that is its API),
  decode by calling ``forward`` with its cache on one token at a time in a Python loop.
* ``llama.cpp`` — its ``llama-bench`` binary on the same weights converted to GGUF by llama.cpp's own
  ``convert_hf_to_gguf.py`` (run with this interpreter; the ``gguf-py`` folder next to the script is put
  on ``PYTHONPATH``). Build llama-bench with llama.cpp's own CMake instructions. Prefill is its
  ``pp<len>`` test, decode its ``tg<steps>`` test; each sample is one ``llama-bench ... -o json`` run
  (after its own warm-up), taken from its ``samples_ns``.

Method: every implementation is warmed up (compiled) first; then, for each workload, runs alternate
(ssdkit, peer 1, peer 2, ..., ssdkit, peer 1, ...) for ``--rounds`` rounds so that machine drift hits
all alike, and the table gives medians and ssdkit ÷ peer ratios measured in this one run. Decode time
per step is ``(t(generate N+1 tokens) − t(generate 1 token)) / N`` for the in-process implementations,
the two calls back to back (this removes the prompt and the call overhead).

``--dtype`` sets ssdkit's weight dtype; transformers and mamba2-jax get their weights in the same dtype,
llama.cpp the GGUF type ``--gguf-type`` (default ``f32`` for float32, ``f16`` for bfloat16).

    python benchmarks/compare.py --model 130m --prefill-lengths 128,512,2048 --decode-steps 32 --rounds 3 \\
        --peers transformers,mamba2-jax,llama.cpp \\
        --llama-bench /path/to/llama.cpp/build/bin/llama-bench \\
        --llama-convert /path/to/llama.cpp/convert_hf_to_gguf.py      # or: --gguf model-f32.gguf
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ssdkit
from models import mamba2
from models.bench import load_params
from models.mamba2 import cost
from ssdkit.bench import RooflinePoint, measure_ceilings, plot_roofline, time_calls

PEERS = ("transformers", "mamba2-jax", "llama.cpp")
#: Bytes per weight of GGUF types (q8_0: blocks of 32 int8 weights and one float16 scale), for the roofline.
GGUF_BYTES_PER_WEIGHT = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}
PROMPT_LEN = 8  # decode prompt for the in-process implementations

#: One timed sample of a workload: seconds per token.
Sampler = Callable[[], float]


def _seconds(fn: Callable[[], object]) -> float:
    """Wall seconds of one call of ``fn`` (blocking on JAX results)."""
    return time_calls(fn, repeats=1, warmup=0).median


class InProcess(abc.ABC):
    """An implementation running in this process. Subclasses give ``prefill_fn`` (tokens -> a call that runs
    one prefill) and ``generate_fn`` (prompt -> a call that generates k tokens greedily)."""

    name: str

    @abc.abstractmethod
    def prefill_fn(self, tokens: np.ndarray) -> Callable[[], object]: ...

    @abc.abstractmethod
    def generate_fn(self, prompt: np.ndarray) -> Callable[[int], object]: ...

    def prefill_sampler(self, tokens: np.ndarray) -> Sampler:
        fn = self.prefill_fn(tokens)
        _seconds(fn)  # warm-up / compile
        return lambda: _seconds(fn) / tokens.shape[1]

    def decode_sampler(self, prompt: np.ndarray, steps: int) -> Sampler:
        gen = self.generate_fn(prompt)
        _seconds(lambda: gen(steps + 1))  # warm-up / compile both lengths
        _seconds(lambda: gen(1))
        return lambda: (_seconds(lambda: gen(steps + 1)) - _seconds(lambda: gen(1))) / steps


class SsdKit(InProcess):
    def __init__(self, params, cfg, dtype):
        self.name = f"ssdkit {jnp.dtype(dtype).name}"
        self.weight_bytes = jnp.dtype(dtype).itemsize
        self.cfg = cfg
        self.params = mamba2.cast_params(params, dtype)
        self.decode_params = mamba2.unstack_layers(self.params)  # the decode layout (weights read in place)

    def prefill_fn(self, tokens):
        jt = jnp.asarray(tokens)
        return lambda: mamba2.prefill(self.params, self.cfg, jt)

    def generate_fn(self, prompt):
        model, jp = mamba2.Mamba2LM(self.cfg), jnp.asarray(prompt)
        return lambda k: ssdkit.generate(model, self.decode_params, jp, max_new_tokens=k).tokens


class Transformers(InProcess):
    def __init__(self, checkpoint: Path, dtype, threads: int):
        import torch
        import transformers

        torch.set_num_threads(threads)
        self.torch = torch
        self.name = f"transformers {jnp.dtype(dtype).name}"
        self.weight_bytes = jnp.dtype(dtype).itemsize
        self.model = transformers.Mamba2ForCausalLM.from_pretrained(
            checkpoint, dtype=getattr(torch, jnp.dtype(dtype).name)).eval()

    def prefill_fn(self, tokens):
        tt = self.torch.as_tensor(tokens, dtype=self.torch.long)

        def run():
            with self.torch.no_grad():
                return self.model(tt, logits_to_keep=1).logits

        return run

    def generate_fn(self, prompt):
        tp = self.torch.as_tensor(prompt, dtype=self.torch.long)

        def run(k):
            with self.torch.no_grad():
                return self.model.generate(tp, attention_mask=self.torch.ones_like(tp), max_new_tokens=k,
                                           min_new_tokens=k, do_sample=False, pad_token_id=0)

        return run


class Mamba2Jax(InProcess):
    def __init__(self, cfg: mamba2.Mamba2Config, dtype):
        import mamba2_jax
        from flax import nnx

        self.name = f"mamba2-jax {jnp.dtype(dtype).name}"
        self.weight_bytes = jnp.dtype(dtype).itemsize
        self.forward = mamba2_jax.forward
        self.model = mamba2_jax.create_random_model(mamba2_jax.Mamba2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, state_size=cfg.d_state, head_dim=cfg.headdim,
            chunk_size=cfg.chunk_size, expand=cfg.expand, conv_kernel=cfg.d_conv, num_hidden_layers=cfg.n_layer,
            layer_norm_epsilon=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings), seed=0)
        if cfg.ngroups != 1:
            raise ValueError(f"mamba2-jax has no B/C groups (this config has ngroups={cfg.ngroups})")
        if jnp.dtype(dtype) != jnp.float32:
            state = nnx.state(self.model, nnx.Param)
            nnx.update(self.model, jax.tree.map(lambda x: x.astype(dtype), state))

    def prefill_fn(self, tokens):
        jt = jnp.asarray(tokens)
        return lambda: self.forward(self.model, jt)["logits"]

    def generate_fn(self, prompt):
        jp = jnp.asarray(prompt)

        def greedy(out):
            return jnp.argmax(out["logits"][:, -1:], axis=-1).astype(jnp.int32)

        def run(k):
            out = self.forward(self.model, jp)
            token = greedy(out)
            for _ in range(k - 1):
                out = self.forward(self.model, token, cache=out["cache"])
                token = greedy(out)
            return token

        return run


class LlamaCpp:
    """llama.cpp's ``llama-bench`` on a GGUF file; one sample = one ``llama-bench -r reps`` run."""

    def __init__(self, bench: str, gguf: Path, gguf_type: str, threads: int, reps: int):
        self.name = f"llama.cpp {gguf_type}"
        self.weight_bytes = GGUF_BYTES_PER_WEIGHT.get(gguf_type, 4)
        self.bench, self.gguf, self.threads, self.reps = bench, gguf, threads, reps

    def _run(self, n_prompt: int, n_gen: int) -> float:
        cmd = [self.bench, "-m", str(self.gguf), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(self.threads),
               "-r", str(self.reps), "-o", "json"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        (test,) = json.loads(proc.stdout)
        return statistics.median(test["samples_ns"]) / 1e9 / (n_prompt + n_gen)

    def prefill_sampler(self, tokens: np.ndarray) -> Sampler:
        return lambda: self._run(tokens.shape[1], 0)

    def decode_sampler(self, prompt: np.ndarray, steps: int) -> Sampler:
        return lambda: self._run(0, steps)


def convert_to_gguf(convert: str, checkpoint: Path, outtype: str, out: Path) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` (with this interpreter) on a checkpoint directory."""
    gguf_py = Path(convert).resolve().parent / "gguf-py"
    env = dict(os.environ)
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(gguf_py), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, convert, str(checkpoint), "--outtype", outtype, "--outfile", str(out)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{convert} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return out


def _llama_cpp(args, dtype, checkpoint: Callable[[], Path], scratch: Path) -> LlamaCpp:
    bench = args.llama_bench or shutil.which("llama-bench")
    if not bench or not Path(bench).is_file():
        raise RuntimeError(f"no llama-bench binary {'at ' + bench if bench else 'on PATH'} (pass --llama-bench PATH)")
    gguf_type = args.gguf_type or ("f32" if dtype == jnp.float32 else "f16")
    if args.gguf:
        gguf = Path(args.gguf)
        gguf_type = args.gguf_type or gguf.stem  # only a label here
    elif args.llama_convert:
        print(f"[compare] converting to GGUF ({gguf_type}) with {args.llama_convert} ...", flush=True)
        gguf = convert_to_gguf(args.llama_convert, checkpoint(), gguf_type, scratch / f"model-{gguf_type}.gguf")
    else:
        raise RuntimeError("no model (pass --gguf FILE or --llama-convert PATH/convert_hf_to_gguf.py)")
    return LlamaCpp(bench, gguf, gguf_type, args.threads, args.llama_reps)


def _peer(name: str, args, cfg, dtype, checkpoint: Callable[[], Path], scratch: Path):
    """Build one peer; returns None (after a one-line message) when it is not available."""
    try:
        if name == "transformers":
            return Transformers(checkpoint(), dtype, args.threads)
        if name == "mamba2-jax":
            return Mamba2Jax(cfg, dtype)
        return _llama_cpp(args, dtype, checkpoint, scratch)
    except Exception as err:  # noqa: BLE001 - a peer that cannot be set up is skipped
        first_line = (str(err).splitlines() or [""])[0]
        print(f"[compare] skipping {name}: {type(err).__name__}: {first_line}", flush=True)
        return None


def alternate(samplers: list[Sampler], rounds: int) -> list[float]:
    """Run the samplers in turn, ``rounds`` times; the median seconds per token of each."""
    samples: list[list[float]] = [[] for _ in samplers]
    for _ in range(rounds):
        for sampler, out in zip(samplers, samples, strict=True):
            out.append(sampler())
    return [statistics.median(s) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="130m", help="a preset (random weights) or a checkpoint directory")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="ssdkit's weight dtype")
    ap.add_argument("--prefill-lengths", default="128,512,2048")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (match the machine's cores)")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    ap.add_argument("--llama-bench", help="path to llama.cpp's llama-bench binary (default: on PATH)")
    ap.add_argument("--llama-convert", help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--gguf", help="an already converted GGUF file (instead of --llama-convert)")
    ap.add_argument("--gguf-type", choices=("f32", "f16", "bf16", "q8_0"),
                    help="GGUF type to convert to (default: f32 for float32, f16 for bfloat16)")
    ap.add_argument("--llama-reps", type=int, default=1, help="llama-bench -r per sample")
    ap.add_argument("--plot", help="also write a roofline PNG of every implementation (needs matplotlib)")
    args = ap.parse_args()
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(peers) - set(PEERS):
        ap.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    dtype = jnp.dtype(args.dtype)
    lengths = [int(v) for v in args.prefill_lengths.split(",") if v]

    with tempfile.TemporaryDirectory(prefix="ssdkit-compare-") as tmp:
        scratch = Path(tmp)
        params, cfg = load_params(args.model, jnp.float32)
        ckpt: list[Path] = []

        def checkpoint() -> Path:  # the float32 weights on disk, written once if a peer needs them
            if not ckpt:
                ckpt.append(Path(args.model) if Path(args.model).is_dir() else scratch / "checkpoint")
                if ckpt[0] != Path(args.model):
                    mamba2.save_checkpoint(params, cfg, ckpt[0])
            return ckpt[0]

        impls = [SsdKit(params, cfg, dtype)]
        impls += [p for p in (_peer(name, args, cfg, dtype, checkpoint, scratch) for name in peers) if p is not None]

        def tokens(seq: int) -> np.ndarray:
            return np.random.default_rng(seq).integers(1, cfg.vocab_size, (1, seq)).astype(np.int32)

        workloads = [(f"prefill {seq}", lambda impl, seq=seq: impl.prefill_sampler(tokens(seq))) for seq in lengths]
        workloads.append(("decode b=1", lambda impl: impl.decode_sampler(tokens(PROMPT_LEN), args.decode_steps)))
        ceilings = measure_ceilings(dtype) if args.plot else None
        rows = []
        for name, make in workloads:
            seconds = alternate([make(impl) for impl in impls], args.rounds)
            rates = [1 / s for s in seconds]
            rows.append((name, rates))
            print(f"{name}: " + ", ".join(f"{i.name} {r:,.1f}" for i, r in zip(impls, rates, strict=True))
                  + " tokens/s", flush=True)

    head = [f"workload (ssdkit {dtype.name}, batch 1)", "ssdkit tokens/s",
            *(f"{i.name} tokens/s (ssdkit ÷ it)" for i in impls[1:])]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, rates in rows:
        cells = [f"{rates[0]:,.1f}", *(f"{r:,.1f} ({rates[0] / r:.2f}x)" for r in rates[1:])]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.plot:
        points = [roofline_point(cfg, impl, name, rate) for name, rates in rows
                  for impl, rate in zip(impls, rates, strict=True)]
        out = plot_roofline([ceilings], points, args.plot, title=f"Mamba-2 {args.model}, batch 1: ssdkit and peers")
        print(f"[compare] roofline written to {out}", flush=True)


def roofline_point(cfg: mamba2.Mamba2Config, impl, workload: str, tokens_per_s: float) -> RooflinePoint:
    """One workload of one implementation on the roofline. Every implementation is credited with the same
    analytic work (models.mamba2.cost, ssdkit's chunked count; mamba2-jax's logits at every position and
    llama.cpp's step-by-step scan are not counted differently) and its own bytes per weight."""
    if workload.startswith("prefill"):
        seq = int(workload.split()[1])
        flops = cost.prefill_flops(cfg, 1, seq, chunk_size=ssdkit.preferred_chunk_size(cfg.chunk_size))
        nbytes = cost.prefill_bytes(cfg, 1, seq, impl.weight_bytes)
        per_token = flops / seq
    else:
        flops = per_token = cost.decode_flops(cfg, 1)
        nbytes = cost.decode_bytes(cfg, 1, impl.weight_bytes).total
    return RooflinePoint(impl.name, workload, per_token * tokens_per_s, flops / nbytes)


if __name__ == "__main__":
    main()

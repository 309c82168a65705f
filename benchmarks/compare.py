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

**Training** (``--train``): the training step of ``ssdkit train`` (``ssdkit.models.training.make_step`` with its
default ``--remat layer``: loss, gradient, global-norm clipping at 1.0 and AdamW with lr 3e-4, betas (0.9,
0.95), weight decay 0.1 on the matrices only) against the same step in transformers
(``Mamba2ForCausalLM(labels=...)`` in train mode, ``loss.backward()``, ``clip_grad_norm_(1.0)``,
``torch.optim.AdamW`` with the same hyper-parameters and the same decay split), same weights, batch and
sequence length, alternating for ``--rounds`` rounds after two warm-up steps each. ssdkit's step runs at
``--compute-dtype`` (default ``auto``, as ``ssdkit train`` resolves it: bfloat16 products where this machine's
are the faster, ``ssdkit.matmul_probe``), transformers' in float32; each implementation's MFU is against the
GEMM ceiling of the dtype its products run in, measured in the same run. Peak memory is each
implementation's peak resident set (``VmHWM``) in a worker process of its own (one process cannot tell apart
the two libraries' allocations), with the RSS after setup (weights, optimiser state, libraries) beside it. The
workers stay alive and alternate step by step; with ``--isolate`` only one is in memory at a time (a fresh
process per sample, two warm-up steps each).

    python benchmarks/compare.py --train --model 130m --train-lengths 512 --rounds 5
    python benchmarks/compare.py --train --model 130m --train-lengths 2048 --rounds 3 --isolate

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
from ssdkit.bench import RooflinePoint, measure_ceilings, plot_roofline, time_calls
from ssdkit.models import mamba2, training
from ssdkit.models.bench import load_params, model_config
from ssdkit.models.mamba2 import cost

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


# ------------------------------------------------------------------------------ training
class SsdKitTrain:
    name = "ssdkit"

    def __init__(self, params, cfg, batch: int, seq: int, remat: str, compute_dtype: str = "auto"):
        from ssdkit.models.bench import train_batch, train_optimizer

        optimizer = train_optimizer()
        self.step_fn = training.make_step(cfg, optimizer, remat=remat, compute_dtype=compute_dtype)
        self.state = ssdkit.TrainState.create(jax.tree_util.tree_map(jnp.copy, params), optimizer)
        self.data = train_batch(cfg, batch, seq)
        self.tokens = batch * seq

    def step(self) -> float:
        self.state, metrics = self.step_fn(self.state, self.data)
        return float(metrics.loss)


class TransformersTrain:
    name = "transformers"

    def __init__(self, checkpoint: Path, cfg, batch: int, seq: int, threads: int):
        import torch
        import transformers

        from ssdkit.models.bench import train_batch

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = transformers.Mamba2ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).train()
        no_decay = ("embedding", "norm", "bias", "A_log", "dt_bias")
        decay, keep = [], []
        for name, p in self.model.named_parameters():
            plain = p.ndim < 2 or any(k in name for k in no_decay) or name.endswith(".D")
            (keep if plain else decay).append(p)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": keep, "weight_decay": 0.0}],
                                     lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
        self.data = torch.tensor(np.asarray(train_batch(cfg, batch, seq)[0]), dtype=torch.long)
        self.tokens = batch * seq

    def step(self) -> float:
        loss = self.model(self.data, labels=self.data).loss
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def _rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set now (``VmRSS``) or its peak (``VmHWM``), from Linux /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def train_worker(args) -> None:
    """Child process: build one implementation, then serve ``step`` (prints seconds) and ``memory``
    (prints JSON) commands read from stdin, one per line, until ``quit``.

    Each implementation runs in a process of its own, so that neither's thread pools, allocator caches
    or resident memory touch the other's figures."""
    params, cfg = load_params(args.model, jnp.float32, stacked=True)
    if args.train_worker == "ssdkit":
        impl = SsdKitTrain(params, cfg, args.train_batch, args.worker_seq, args.remat, args.compute_dtype)
    else:
        impl = TransformersTrain(Path(args.worker_checkpoint), cfg, args.train_batch, args.worker_seq, args.threads)
    del params
    setup = _rss_bytes()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            print(_seconds(impl.step), flush=True)
        elif cmd == "memory":
            print(json.dumps({"setup_rss": setup, "peak_rss": _rss_bytes("VmHWM")}), flush=True)
        else:
            return


class Worker:
    """The parent's handle on a :func:`train_worker` process."""

    def __init__(self, name: str, args, checkpoint: Path, seq: int):
        self.name = name
        cmd = [sys.executable, __file__, "--train-worker", name, "--worker-checkpoint", str(checkpoint),
               "--worker-seq", str(seq), "--model", args.model, "--train-batch", str(args.train_batch),
               "--threads", str(args.threads), "--remat", args.remat, "--compute-dtype", args.compute_dtype]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tokens = args.train_batch * seq
        if self._read() != "ready":
            raise RuntimeError(f"the {name} worker did not start")

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.wait()})")
        return line.strip()

    def ask(self, cmd: str) -> str:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def _start(name: str, args, ckpt: Path, seq: int) -> Worker | None:
    try:
        return Worker(name, args, ckpt, seq)
    except Exception as err:  # noqa: BLE001 - a peer that cannot be set up is skipped
        print(f"[compare] skipping {name}: {type(err).__name__}: {err}", flush=True)
        return None


def _alternate_workers(names, args, ckpt: Path, seq: int):
    """All workers alive at once (started one at a time), two warm-up steps each, then alternating steps.
    Returns (median seconds per token, memory figures), None for a worker that did not start."""
    workers = []
    try:
        workers = [_start(name, args, ckpt, seq) for name in names]
        live = [w for w in workers if w is not None]
        for w in live:  # warm-up: compile, allocate
            w.ask("step")
            w.ask("step")
        timed = alternate([lambda w=w: float(w.ask("step")) / w.tokens for w in live], args.rounds)
        it = iter(timed)
        seconds = [None if w is None else next(it) for w in workers]
        return seconds, [None if w is None else json.loads(w.ask("memory")) for w in workers]
    finally:
        for w in workers:
            if w is not None:
                w.close()


def _alternate_isolated(names, args, ckpt: Path, seq: int):
    """``--isolate``: one implementation in memory at a time. Each round starts every worker in turn,
    runs two warm-up steps and one timed step, records its memory and stops it."""
    samples = {name: [] for name in names}
    mem: dict = {name: None for name in names}
    for _ in range(args.rounds):
        for name in names:
            w = _start(name, args, ckpt, seq)
            if w is None:
                continue
            try:
                w.ask("step")
                w.ask("step")
                samples[name].append(float(w.ask("step")) / w.tokens)
                m = json.loads(w.ask("memory"))
                mem[name] = m if mem[name] is None or m["peak_rss"] > mem[name]["peak_rss"] else mem[name]
            finally:
                w.close()
    return [statistics.median(samples[n]) if samples[n] else None for n in names], [mem[n] for n in names]


def main_train(args, peers: list[str]) -> None:
    lengths = [int(v) for v in args.train_lengths.split(",") if v]
    names = ["ssdkit"] + [p for p in peers if p == "transformers"]
    for p in peers:
        if p != "transformers":
            print(f"[compare] skipping {p}: it has no training step", flush=True)
    cfg = model_config(args.model) if not Path(args.model).is_dir() else mamba2.Mamba2Config.from_json(
        Path(args.model) / "config.json")
    with tempfile.TemporaryDirectory(prefix="ssdkit-compare-") as tmp:
        ckpt = Path(args.model) if Path(args.model).is_dir() else Path(tmp) / "checkpoint"
        if ckpt != Path(args.model):
            params, _ = load_params(args.model, jnp.float32)
            mamba2.save_checkpoint(params, cfg, ckpt)
            del params
        compute = training.resolve_compute_dtype(args.compute_dtype)
        print(f"[compare] ssdkit: {compute.describe()}; transformers: float32", flush=True)
        gemm_dtypes = sorted({"float32", compute.products})  # each implementation's products' dtype

        def measure_all():
            return {d: measure_ceilings(jnp.dtype(d)) for d in gemm_dtypes}

        ceils = [measure_all()]
        rows = []
        for seq in lengths:
            if args.isolate:
                seconds, mem = _alternate_isolated(names, args, ckpt, seq)
            else:
                seconds, mem = _alternate_workers(names, args, ckpt, seq)
            names_ = [n for n, m in zip(names, mem, strict=True) if m is not None]
            seconds = [s for s, m in zip(seconds, mem, strict=True) if m is not None]
            mem = [m for m in mem if m is not None]
            flops = cost.train_flops(cfg, args.train_batch, seq, chunk_size=ssdkit.preferred_chunk_size(cfg.chunk_size))
            rows.append((seq, names_, seconds, flops, mem))
            print(f"train {args.train_batch}x{seq}: " + ", ".join(
                f"{n} {1 / s:,.1f} tokens/s" for n, s in zip(rows[-1][1], seconds, strict=True)), flush=True)
            ceils.append(measure_all())
    # MFU against the highest of the GEMM medians measured before and after each workload: a ceiling
    # measured while the shared machine was slow would flatter every implementation alike
    peak = {}
    for d in gemm_dtypes:
        peak[d] = max(c[d].gemm_flops for c in ceils)
        print(f"[compare] {d} GEMM ceiling {peak[d] / 1e9:.1f} GFLOP/s (highest of {len(ceils)} medians: "
              + ", ".join(f"{c[d].gemm_flops / 1e9:.0f}" for c in ceils) + ")", flush=True)
    products = {"ssdkit": compute.products, "transformers": "float32"}

    print(f"\n| train step (ssdkit {compute.weights} compute, {compute.products} products; batch {args.train_batch}) "
          "| implementation | tokens/s | s/step | MFU (of its products' GEMM ceiling) | ssdkit ÷ it (speed) "
          "| peak RSS MiB | RSS after setup MiB |\n|---|---|---|---|---|---|---|---|")
    for seq, names_, seconds, flops, mem in rows:
        for name, s, m in zip(names_, seconds, mem, strict=True):
            step_s = s * args.train_batch * seq
            mfu = flops / step_s / peak[products[name]]
            print(f"| {seq} tokens | {name} | {1 / s:,.1f} | {step_s:.2f} | {100 * mfu:.1f}% | {s / seconds[0]:.2f}x "
                  f"| {m['peak_rss'] / 2**20:,.0f} | {m['setup_rss'] / 2**20:,.0f} |")


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
    ap.add_argument("--train", action="store_true", help="compare training steps instead (see above)")
    ap.add_argument("--train-lengths", default="512,2048", help="with --train: tokens per row")
    ap.add_argument("--train-batch", type=int, default=1, help="with --train: rows per step")
    ap.add_argument("--remat", default="layer", choices=("none", "layer", "matmuls"),
                    help="with --train: ssdkit's remat policy (default: ssdkit train's, layer)")
    ap.add_argument("--compute-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="with --train: ssdkit's compute dtype (default: auto, as `ssdkit train` resolves it)")
    ap.add_argument("--isolate", action="store_true",
                    help="with --train: one implementation in memory at a time (a fresh process per sample), "
                         "for steps whose peaks do not fit in memory together (130M at 2,048 tokens on 24 GiB)")
    ap.add_argument("--train-worker", choices=("ssdkit", "transformers"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-checkpoint", help=argparse.SUPPRESS)
    ap.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_worker:
        train_worker(args)
        return
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(peers) - set(PEERS):
        ap.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    if args.train:
        main_train(args, peers)
        return
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
    analytic work (ssdkit.models.mamba2.cost, ssdkit's chunked count; mamba2-jax's logits at every position and
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

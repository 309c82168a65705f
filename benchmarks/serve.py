"""Serving throughput and latency, modelled on ``vllm bench serve``: N concurrent streaming clients on loopback.

Starts ``ssdkit serve`` (and, with ``--llama-server`` and ``--gguf``, llama.cpp's ``llama-server`` on the
same weights converted to GGUF), one server at a time, each in its own process with the machine to itself,
and drives it with the official ``openai`` client (``AsyncOpenAI``, streaming completions). Every server
gets the same requests:

* ``random``: prompts of random token ids (lengths uniform in ``--prompt-lens``), asking for a number of
  tokens uniform in ``--output-lens``, greedy, ``ignore_eos`` (so each request makes exactly that many), at
  each concurrency of ``--concurrency`` (``--requests`` requests per level, at most that many in flight);
* ``shared-prefix``: ``--shared-requests`` prompts that share their first ``--shared-tokens`` tokens (a
  long system prompt) and then differ, at concurrency ``--shared-concurrency``: the prefix cache's
  workload. For ssdkit, the prefill tokens saved come from its ``/metrics``.

Reported per level: requests/s, output tokens/s, time to first token (TTFT), time per output token after
the first (TPOT: (latency - TTFT) / (tokens - 1) per request) and inter-token latency (ITL: the gaps
between streamed chunks), each as median, p90 and p99. One run, servers one after the other: read
``lscpu`` first and run nothing else meanwhile.

    python benchmarks/serve.py --model 130m --slots 8 --concurrency 1,8,32
    python benchmarks/serve.py --model /path/to/hf-folder --llama-server llama.cpp/build/bin/llama-server \
        --gguf mamba2-130m-f32.gguf --json serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai


@dataclasses.dataclass
class Record:
    prompt_tokens: int
    output_tokens: int
    ttft: float
    latency: float
    gaps: list[float]

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclasses.dataclass
class Level:
    name: str
    concurrency: int
    wall: float
    records: list[Record]
    extra: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        def pct(values):
            v = np.asarray([x for x in values if x is not None], np.float64) * 1e3
            return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                    "p99": float(np.percentile(v, 99))} if v.size else None

        out = sum(r.output_tokens for r in self.records)
        return {"workload": self.name, "concurrency": self.concurrency, "requests": len(self.records),
                "wall_s": self.wall, "requests_per_s": len(self.records) / self.wall, "output_tokens": out,
                "output_tokens_per_s": out / self.wall, "ttft_ms": pct(r.ttft for r in self.records),
                "tpot_ms": pct(r.tpot for r in self.records),
                "itl_ms": pct(g for r in self.records for g in r.gaps), **self.extra}


# ------------------------------------------------------------------------------ servers
class ServerProcess:
    def __init__(self, name: str, command: list[str], url: str, model: str, env: dict | None = None):
        self.name, self.command, self.url, self.model = name, command, url, model
        self.env = env
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self.log = open(f"/tmp/bench-serve-{self.name}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not come up in 900 s; see {self.log.name}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def metrics(self) -> dict[str, float]:
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=5).text
        except httpx.HTTPError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ clients
async def one_request(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> Record:
    t0 = time.perf_counter()
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    stamps, usage = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None) is not None:
            usage = chunk.usage
    end = time.perf_counter()
    n = usage.completion_tokens if usage is not None else len(stamps)
    first = stamps[0] if stamps else end
    return Record(len(prompt), n, first - t0, (stamps[-1] if stamps else end) - t0, list(np.diff(stamps)))


async def run_level(server: ServerProcess, name: str, requests: list[tuple[list[int], int]],
                    concurrency: int) -> Level:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt, n):
        async with gate:
            return await one_request(client, server.model, prompt, n)

    t0 = time.perf_counter()
    records = await asyncio.gather(*(gated(p, n) for p, n in requests))
    wall = time.perf_counter() - t0
    await client.close()
    return Level(name, concurrency, wall, list(records))


def random_requests(rng, count, prompt_lens, output_lens, id_range) -> list[tuple[list[int], int]]:
    return [([int(i) for i in rng.integers(*id_range, rng.integers(prompt_lens[0], prompt_lens[1] + 1))],
             int(rng.integers(output_lens[0], output_lens[1] + 1))) for _ in range(count)]


def shared_requests(rng, count, shared, suffix_lens, output, id_range) -> list[tuple[list[int], int]]:
    prefix = [int(i) for i in rng.integers(*id_range, shared)]
    return [(prefix + [int(i) for i in rng.integers(*id_range, rng.integers(suffix_lens[0], suffix_lens[1] + 1))],
             output) for _ in range(count)]


def bench_server(server: ServerProcess, args, seed_requests) -> list[Level]:
    levels = []
    asyncio.run(run_level(server, "warm-up", seed_requests["warmup"], 1))
    for c in args.concurrency:
        before = server.metrics()
        level = asyncio.run(run_level(server, "random", seed_requests[c], c))
        level.extra.update(_prefix_stats(before, server.metrics()))
        levels.append(level)
        print(_line(server.name, level.summary()), flush=True)
    before = server.metrics()
    level = asyncio.run(run_level(server, "shared-prefix", seed_requests["shared"], args.shared_concurrency))
    stats = _prefix_stats(before, server.metrics())
    if stats:
        shared_total = args.shared_tokens * args.shared_requests
        stats["shared_tokens"] = shared_total
        stats["saved_of_shared"] = stats["prefill_tokens_saved"] / shared_total
    level.extra.update(stats)
    levels.append(level)
    print(_line(server.name, level.summary()), flush=True)
    return levels


def _prefix_stats(before: dict, after: dict) -> dict:
    key = "ssdkit_prefix_cache_hit_tokens_total"
    if key not in after:
        return {}
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"prefill_tokens_saved": d[key], "prompt_tokens": d.get("ssdkit_prompt_tokens_total", 0),
            "prefix_hits": d.get("ssdkit_prefix_cache_hits_total", 0),
            "prefix_lookups": d.get("ssdkit_prefix_cache_lookups_total", 0)}


def _line(name: str, s: dict) -> str:
    def f(d):
        return "-" if d is None else f"{d['median']:.0f}/{d['p90']:.0f}/{d['p99']:.0f}"

    extra = ""
    if "saved_of_shared" in s:
        extra = (f"  prefill saved {s['prefill_tokens_saved']:.0f} of {s['shared_tokens']} shared "
                 f"({s['saved_of_shared']:.0%})")
    return (f"{name:>12} {s['workload']:>13} c={s['concurrency']:<3} {s['requests']:>3} req in {s['wall_s']:6.1f} s: "
            f"{s['requests_per_s']:5.2f} req/s {s['output_tokens_per_s']:7.1f} out tok/s  TTFT {f(s['ttft_ms'])} ms  "
            f"TPOT {f(s['tpot_ms'])} ms  ITL {f(s['itl_ms'])} ms (median/p90/p99){extra}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="130m", help="ssdkit serve --model: a preset (random weights), a folder")
    p.add_argument("--slots", type=int, default=8, help="ssdkit --slots and llama-server --parallel (default 8)")
    p.add_argument("--concurrency", default="1,8,32", help="streams in flight per level (default 1,8,32)")
    p.add_argument("--requests", default="8,32,64", help="requests per level (default 8,32,64)")
    p.add_argument("--prompt-lens", default="32,256", help="prompt length range in tokens (default 32,256)")
    p.add_argument("--output-lens", default="32,96", help="output length range in tokens (default 32,96: mean 64)")
    p.add_argument("--shared-tokens", type=int, default=600, help="shared prefix of the shared-prefix workload")
    p.add_argument("--shared-requests", type=int, default=16)
    p.add_argument("--shared-concurrency", type=int, default=8)
    p.add_argument("--snapshot-interval", type=int, default=256, help="ssdkit serve --snapshot-interval")
    p.add_argument("--id-range", default="1000,20000", help="token ids drawn from this range (both vocabularies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (with --gguf)")
    p.add_argument("--gguf", default=None, help="the same weights as a GGUF file, for llama-server")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t (default 2)")
    p.add_argument("--only", default=None, choices=("ssdkit", "llama.cpp"), help="run one server only")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = [int(c) for c in args.requests.split(",")]
    prompt_lens = tuple(int(x) for x in args.prompt_lens.split(","))
    output_lens = tuple(int(x) for x in args.output_lens.split(","))
    id_range = tuple(int(x) for x in args.id_range.split(","))
    rng = np.random.default_rng(args.seed)
    work = {"warmup": random_requests(rng, 2, prompt_lens, (8, 8), id_range)}
    for c, n in zip(args.concurrency, counts, strict=True):
        work[c] = random_requests(rng, n, prompt_lens, output_lens, id_range)
    work["shared"] = shared_requests(rng, args.shared_requests, args.shared_tokens, (16, 64), 32, id_range)

    servers = []
    if args.only in (None, "ssdkit"):
        port = free_port()
        servers.append(ServerProcess("ssdkit", [
            sys.executable, "-m", "ssdkit.models.cli", "serve", "--model", args.model, "--port", str(port),
            "--slots", str(args.slots), "--max-queue", "256", "--snapshot-interval", str(args.snapshot_interval),
            "--served-model-name", "bench"], f"http://127.0.0.1:{port}", "bench"))
    if args.llama_server and args.gguf and args.only in (None, "llama.cpp"):
        port = free_port()
        ctx = args.slots * (prompt_lens[1] + output_lens[1] + args.shared_tokens + 128)
        servers.append(ServerProcess("llama.cpp", [
            args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
            "--parallel", str(args.slots), "-c", str(ctx), "--cont-batching", "--metrics",
            "--threads-http", str(max(args.concurrency + [args.shared_concurrency]) + 8)],
            f"http://127.0.0.1:{port}", "bench"))
    results = {}
    for server in servers:
        with server:
            results[server.name] = [level.summary() for level in bench_server(server, args, work)]
    report = {"args": vars(args), "results": results, "machine": _machine()}
    _ratios(results, args.concurrency)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def _ratios(results: dict, concurrency: list[int]) -> None:
    ours = {(r["workload"], r["concurrency"]): r for r in results.get("ssdkit", [])}
    if ("random", concurrency[0]) in ours:
        base = ours[("random", concurrency[0])]["output_tokens_per_s"]
        for c in concurrency[1:]:
            ratio = ours[("random", c)]["output_tokens_per_s"] / base
            print(f"ssdkit: output tokens/s at c={c} is {ratio:.2f}x c={concurrency[0]}")
    theirs = {(r["workload"], r["concurrency"]): r for r in results.get("llama.cpp", [])}
    for k, r in ours.items():
        if k in theirs:
            print(f"ssdkit / llama.cpp output tokens/s, {k[0]} c={k[1]}: "
                  f"{r['output_tokens_per_s'] / theirs[k]['output_tokens_per_s']:.2f}x")


def _machine() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""


if __name__ == "__main__":
    main()

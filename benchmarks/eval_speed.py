"""``ssdkit eval``'s speed against ``ssdkit bench``'s prefill of the same model, batch and window, in one run.

    python benchmarks/eval_speed.py [--model default|DIR] [--text FILE|FOLDER] [--window 2048] [--batch 1]
                                    [--repeats 3]

Prefill: ``mamba2.model.prefill_program`` on (batch, window) random tokens, compiled ahead, best of
``--repeats`` calls (as ``ssdkit bench`` times it). Eval: ``evaluation.evaluate`` over the files, run
``--repeats`` + 1 times: the first compiles its programs (the seconds ``jax.monitoring`` reports for
tracing, lowering and compiling are printed apart), the best of the others is the rate. Eval's tokens/s counts
the targets scored (every token but each document's first, as ``ssdkit eval`` reports it); prefill's the
tokens of its windows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import jax

    from ssdkit.bench import compile_clock, compile_seconds, time_calls
    from ssdkit.models import evaluation, mamba2, text
    from ssdkit.models.cli import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default=str(Path(sys.base_prefix) / "lib" / f"python3.{sys.version_info.minor}"
                                          / "cmd.py"))
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    files = evaluation.text_files(args.text)
    params, cfg, path, _ = load_model(args.model, "float32", 0)
    if not isinstance(cfg, mamba2.Mamba2Config):
        raise SystemExit("the prefill timing here is Mamba-2's (mamba2.model.prefill_program)")
    tokenizer, _ = text.load(path)

    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.window), 0, cfg.vocab_size)
    prefill_compile, compiled = compile_seconds(mamba2.model.prefill_program, params, cfg, tokens, None, None)
    prefill = time_calls(lambda: compiled(params, tokens, None, None), repeats=args.repeats)
    prefill_rate = args.batch * args.window / prefill.min

    runs, compiling = [], []
    for _ in range(args.repeats + 1):
        with compile_clock() as compiled_for:
            t = time.perf_counter()
            result = evaluation.evaluate(params, cfg, evaluation.read_documents(files, tokenizer),
                                         window=args.window, batch=args.batch)
            runs.append((time.perf_counter() - t, result))
            compiling.append(compiled_for())
    best_s, result = min(runs[1:], key=lambda r: r[0])
    eval_rate = result.tokens / best_s
    print(f"{len(files)} files, {result.num_bytes:,} bytes, {result.tokens:,} targets, "
          f"{result.bits_per_byte:.6f} bits/byte; window {args.window}, batch {args.batch}")
    print(f"prefill: {prefill_rate:,.0f} tokens/s ({prefill.min * 1e3:.0f} ms a window, best of {args.repeats}; "
          f"compile {prefill_compile:.2f} s)")
    print(f"eval:    {eval_rate:,.0f} tokens/s ({best_s:.2f} s, best of {args.repeats}; first run "
          f"{runs[0][0]:.2f} s of which compiling {compiling[0]:.2f} s; later runs compiled "
          f"{max(compiling[1:]):.2f} s)")
    print(f"eval / prefill: {eval_rate / prefill_rate:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

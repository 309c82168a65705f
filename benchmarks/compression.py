"""Bits per byte of a model against general-purpose compressors, on the same files in one run.

    python benchmarks/compression.py [--model default|DIR] [--text python-stdlib:held-out] [--json F]

Each file is compressed on its own (``xz -9e`` = Python's ``lzma`` with preset ``9 | PRESET_EXTREME`` in
the .xz container; ``gzip -9`` = ``zlib`` level 9 in the gzip container): total compressed bits ÷ total
bytes. The model's figure is ``ssdkit eval``'s (``ssdkit.models.evaluation``): every byte and the end of each file
charged, i.e. the code length an arithmetic coder driven by the model would reach (within a few bits per
file).
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compressed_bits(files: list[Path]) -> dict[str, float]:
    """Σ compressed size × 8 over ``files``, each compressed alone, per compressor."""
    out = {"xz -9e": 0.0, "gzip -9": 0.0}
    for f in files:
        data = f.read_bytes()
        out["xz -9e"] += 8 * len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))
        out["gzip -9"] += 8 * len(gzip.compress(data, compresslevel=9, mtime=0))
    return out


def main(argv=None) -> int:
    from ssdkit.models import evaluation, text
    from ssdkit.models.cli import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--text", default="python-stdlib:held-out")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    files = evaluation.text_files(args.text)
    params, cfg, path, _ = load_model(args.model, "float32", 0)
    tokenizer, _ = text.load(path)
    docs = evaluation.read_documents(files, tokenizer)
    result = evaluation.evaluate(params, cfg, docs, window=args.window, batch=args.batch)
    n_bytes = sum(f.stat().st_size for f in files)
    if n_bytes != result.num_bytes:  # undecodable bytes would make the two measure different texts
        raise SystemExit(f"the files are not all valid UTF-8 ({n_bytes} bytes on disk, {result.num_bytes} read)")
    t = time.perf_counter()
    bits = compressed_bits(files)
    rows = {f"ssdkit ({path.name if path else args.model})": result.bits_per_byte,
            **{k: v / n_bytes for k, v in bits.items()}}
    print(f"{len(files)} files, {n_bytes:,} bytes ({args.text}); compressors took {time.perf_counter() - t:.1f} s, "
          f"the model {result.seconds:.1f} s ({result.tokens_per_second:,.0f} tokens/s)\n")
    print("| method | bits per byte |\n|---|---|")
    for name, bpb in rows.items():
        print(f"| {name} | {bpb:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"files": len(files), "bytes": n_bytes, "bits_per_byte": rows},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

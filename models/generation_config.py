"""A model folder's sampling defaults: transformers' ``generation_config.json``.

A checkpoint says how it is best sampled, as a Hugging Face model does: ``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``min_p`` and ``repetition_penalty`` in transformers' meaning (``do_sample`` false or
absent is greedy decoding, the penalty still applying; sampling without ``top_k`` keeps transformers'
default of 50), plus ``presence_penalty`` and ``frequency_penalty`` in OpenAI's (transformers keeps keys it
does not know). ``ssdkit generate`` and ``ssdkit serve`` start from these; a flag or a request field that is
given wins. A folder without the file samples greedily, with no penalty.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

FILE = "generation_config.json"

#: transformers' top_k when sampling and the file names none
HF_DEFAULT_TOP_K = 50


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings as ``ssdkit.make_sampler`` and ``ssdkit.Penalties`` take them (temperature 0 =
    greedy; None = no cut)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    source: str | None = None  # the file they came from; None: the built-in greedy defaults

    def describe(self) -> str:
        """One line: ``temperature 0.8, top-p 0.95, repetition penalty 1.1``."""
        if self.temperature == 0:
            parts = ["greedy"]
        else:
            parts = [f"temperature {self.temperature:g}"]
            parts += [f"{name} {v:g}" for name, v in (("top-k", self.top_k), ("top-p", self.top_p),
                                                      ("min-p", self.min_p)) if v is not None]
        parts += [f"{name} penalty {v:g}" for name, v, off in (
            ("repetition", self.repetition_penalty, 1.0), ("presence", self.presence_penalty, 0.0),
            ("frequency", self.frequency_penalty, 0.0)) if v != off]
        return ", ".join(parts)

    def to_json(self) -> dict:
        """This as a ``generation_config.json`` that transformers and :func:`read` both read the same way."""
        out: dict = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            out.update(temperature=self.temperature, top_k=self.top_k if self.top_k is not None else 0)
            out.update({k: v for k, v in (("top_p", self.top_p), ("min_p", self.min_p)) if v is not None})
        out.update({k: v for k, v, off in (("repetition_penalty", self.repetition_penalty, 1.0),
                                           ("presence_penalty", self.presence_penalty, 0.0),
                                           ("frequency_penalty", self.frequency_penalty, 0.0)) if v != off})
        return out


#: OpenAI's defaults for a request that leaves sampling out: temperature 1, no cuts, no penalties
OPENAI = GenerationDefaults(temperature=1.0)


def _number(raw: dict, key: str, file: Path, *, integer: bool = False):
    v = raw[key]
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not math.isfinite(v):
        raise ValueError(f"{file}: {key} must be {'an integer' if integer else 'a finite number'}, got {v!r}")
    return v


def read(folder: str | Path | None) -> GenerationDefaults:
    """The sampling defaults of model folder ``folder`` (the built-in greedy ones when it has no
    ``generation_config.json``, or is None). A file that is not a JSON object, or a key of the wrong type or
    out of range, is a ValueError naming the file and the key."""
    if folder is None or not (Path(folder) / FILE).is_file():
        return GenerationDefaults()
    file = Path(folder) / FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not readable JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(raw).__name__}")
    sample = raw.get("do_sample", False)
    if not isinstance(sample, bool):
        raise ValueError(f"{file}: do_sample must be true or false, got {sample!r}")
    values: dict = {}
    for key in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if raw.get(key) is not None:
            values[key] = float(_number(raw, key, file))
    if sample:
        values["temperature"] = float(_number(raw, "temperature", file)) if raw.get("temperature") is not None else 1.0
        top_k = _number(raw, "top_k", file, integer=True) if raw.get("top_k") is not None else HF_DEFAULT_TOP_K
        values["top_k"] = None if top_k == 0 else top_k  # transformers: 0 turns the cut off
        for key in ("top_p", "min_p"):
            if raw.get(key) is not None:
                v = float(_number(raw, key, file))
                values[key] = None if (key == "top_p" and v == 1.0) or (key == "min_p" and v == 0.0) else v
        if values["temperature"] == 0:
            raise ValueError(f"{file}: do_sample with temperature 0; set do_sample false for greedy decoding")
    out = GenerationDefaults(**values, source=str(file))
    _check(out, file)
    return out


def _check(d: GenerationDefaults, file: Path) -> None:
    """The library's own checks (``make_sampler``, ``Penalties``), with the file named."""
    import ssdkit

    try:
        ssdkit.make_sampler(d.temperature, d.top_k, d.top_p, d.min_p)
        ssdkit.Penalties(d.repetition_penalty, d.presence_penalty, d.frequency_penalty)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None

"""A model folder's sampling defaults (generation_config.json): transformers' meaning, checked values,
and how ``ssdkit generate``'s flags and a server request's fields sit over them."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

import ssdkit
from ssdkit.models import generation_config
from ssdkit.models.cli import CliError, _checked_sampling, _sampling
from ssdkit.models.generation_config import GenerationDefaults


def _folder(tmp_path, body) -> str:
    (tmp_path / generation_config.FILE).write_text(json.dumps(body) if not isinstance(body, str) else body)
    return str(tmp_path)


def test_transformers_meaning(tmp_path):
    assert generation_config.read(None) == GenerationDefaults() == generation_config.read(tmp_path)
    greedy = generation_config.read(_folder(tmp_path, {"repetition_penalty": 1.2, "temperature": 0.7}))
    assert (greedy.temperature, greedy.repetition_penalty) == (0.0, 1.2)  # no do_sample: greedy, penalty kept
    sampled = generation_config.read(_folder(tmp_path, {"do_sample": True, "top_p": 0.9}))
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (1.0, 50, 0.9)  # transformers' top_k 50
    off = generation_config.read(_folder(tmp_path, {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_p": 0.0}))
    assert (off.top_k, off.top_p, off.min_p) == (None, None, None)  # the values that turn each cut off


def test_round_trip_and_transformers_reads_it_alike(tmp_path):
    d = GenerationDefaults(temperature=0.8, top_p=0.95, min_p=0.02, repetition_penalty=1.1, presence_penalty=0.3)
    (tmp_path / generation_config.FILE).write_text(json.dumps(d.to_json()))
    assert generation_config.read(tmp_path) == dataclasses.replace(d, source=str(tmp_path / generation_config.FILE))
    transformers = pytest.importorskip("transformers")
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert (hf.do_sample, hf.temperature, hf.top_k, hf.top_p, hf.min_p, hf.repetition_penalty) == (
        True, 0.8, 0, 0.95, 0.02, 1.1)
    assert d.describe() == "temperature 0.8, top-p 0.95, min-p 0.02, repetition penalty 1.1, presence penalty 0.3"


@pytest.mark.parametrize("body, words", [
    ("{not json", "is not readable JSON"),
    ([1, 2], "must hold a JSON object, got list"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ({"do_sample": True, "temperature": "hot"}, "temperature must be a finite number, got 'hot'"),
    ({"do_sample": True, "top_k": 2.5}, "top_k must be an integer, got 2.5"),
    ({"do_sample": True, "top_p": 1.5}, "top_p"),
    ({"do_sample": True, "temperature": 0}, "do_sample with temperature 0"),
    ({"repetition_penalty": 0}, "repetition penalty"),
    ({"repetition_penalty": True}, "repetition_penalty must be a finite number, got True"),
])
def test_bad_files_name_the_file_and_the_key(tmp_path, body, words):
    with pytest.raises(ValueError, match="generation_config.json") as err:
        generation_config.read(_folder(tmp_path, body))
    assert words in str(err.value)


def _args(**given) -> argparse.Namespace:
    base = {k: None for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                              "frequency_penalty")}
    return argparse.Namespace(**{**base, "max_new_tokens": 8, "stop": None, "speculative": None, **given})


def test_generate_flags_over_the_models_defaults(tmp_path):
    folder = _folder(tmp_path, GenerationDefaults(temperature=0.8, top_p=0.95, repetition_penalty=1.1).to_json())
    sampler, penalties, line = _sampling(_args(), folder)
    assert sampler == ssdkit.Sample(0.8, None, 0.95) and penalties == ssdkit.Penalties(1.1)
    assert line == ("[ssdkit] sampling: temperature 0.8, top-p 0.95, repetition penalty 1.1 (the model's "
                    "generation_config.json)")
    sampler, penalties, line = _sampling(_args(temperature=0.0, repetition_penalty=1.0), folder)
    assert sampler == ssdkit.Greedy() and not penalties.active
    assert line.endswith("greedy (the model's generation_config.json, flags over it)")
    sampler, _, _ = _sampling(_args(top_p=0.5), folder)
    assert sampler == ssdkit.Sample(0.8, None, 0.5)
    # with --speculative the model's penalties are left out, and said so
    _, penalties, line = _sampling(_args(speculative="lookup"), folder)
    assert not penalties.active and line.endswith("(the model's penalties left out: --speculative)")
    # no file: greedy, no penalties
    sampler, penalties, line = _sampling(_args(), tmp_path / "nothing")
    assert sampler == ssdkit.Greedy() and not penalties.active and line.endswith("greedy (the built-in default)")


def test_generate_checks_given_flags_before_any_model_loads():
    with pytest.raises(CliError, match="--top-p"):
        _checked_sampling(_args(top_p=1.5))
    with pytest.raises(CliError, match="--repetition-penalty goes with plain decoding"):
        _checked_sampling(_args(repetition_penalty=1.2, speculative="lookup"))
    assert _checked_sampling(_args(speculative="lookup")) is None  # the model's own penalties are not refused

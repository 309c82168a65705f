"""The ``ssdkit`` command line on a tiny checkpoint made here (no hub, no network)."""

from __future__ import annotations

import collections
import re

import jax
import numpy as np
import pytest

from ssdkit.models import mamba2
from ssdkit.models.cli import main
from tests.helpers import cli_on_the_suite_cache

# tests/test_bench.py's tiny model (the same initialisation programs): one layer is all the CLI needs
CFG = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=16, chunk_size=8)
#: one prompt length and generation length for every greedy run: one prefill and one decode step program
PROMPT, NEW = "1,2,3,4,1,2,3,4,1,2", "12"


@pytest.fixture(scope="module")
def params():
    return mamba2.init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, params):
    path = tmp_path_factory.mktemp("ckpt")
    mamba2.save_checkpoint(params, CFG, path)
    return path


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tmp_path_factory, params):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("ckpt_tok")
    mamba2.save_checkpoint(params, CFG, path)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(autouse=True)
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


def _count_generation(monkeypatch) -> collections.Counter:
    """Counts, as ``ssdkit generate`` runs: the speculative generation program's jitted calls ("call") and
    lowerings ("lower"), runs of a compiled generation program ("run"), and the stream's prefill calls
    ("prefill")."""
    from ssdkit.inference import loop

    counts = collections.Counter()
    program, run, prefill = loop.generate_speculative, loop.CompiledGeneration.__call__, loop._stream_first

    class Counted:
        def __call__(self, *args, **kwargs):
            counts["call"] += 1
            return program(*args, **kwargs)

        def lower(self, *args, **kwargs):
            counts["lower"] += 1
            return program.lower(*args, **kwargs)

    def counted_run(self):
        counts["run"] += 1
        return run(self)

    def counted_prefill(*args, **kwargs):
        counts["prefill"] += 1
        return prefill(*args, **kwargs)

    monkeypatch.setattr(loop, "generate_speculative", Counted())
    monkeypatch.setattr(loop.CompiledGeneration, "__call__", counted_run)
    monkeypatch.setattr(loop, "_stream_first", counted_prefill)
    return counts


def test_generate_with_prompt_ids_and_speculative(ckpt, tmp_path, capsys, monkeypatch):
    """Plain greedy and sampled generation from --prompt-ids; then --speculative lookup and --speculative DIR
    (the checkpoint drafting for itself): plain greedy's tokens (one compiled program each, so equal
    barring a near tie: none at these 12 steps), and the report. Each generation runs once: the speculative
    program is lowered and compiled ahead, then run once (never called through jit, which would compile it
    in the call); compile time and run time are reported apart."""
    counts = _count_generation(monkeypatch)
    args = ["generate", "--model", str(ckpt), "--prompt-ids", PROMPT, "--max-new-tokens", NEW]
    assert main(args) == 0
    out = capsys.readouterr()
    plain = out.out.split()
    ids = [int(t) for t in plain]
    assert len(ids) == int(NEW) and all(0 <= i < CFG.padded_vocab_size for i in ids)
    assert re.search(r"compiling \d+\.\d+ s .*; first token after \d+\.\d+ s.*; \d+\.\d tokens/s after it", out.err)
    assert counts == {"prefill": 1}, counts
    assert main([*args, "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "3",
                 "--dtype", "bfloat16"]) == 0
    assert len(capsys.readouterr().out.split()) == int(NEW)
    for draft in ("lookup", str(ckpt)):
        counts.clear()
        assert main([*args, "--speculative", draft, "--draft-tokens", "2"]) == 0
        out = capsys.readouterr()
        assert out.out.split() == plain
        assert "drafted tokens accepted" in out.err and "tokens per weight pass" in out.err
        assert re.search(r"compiling \d+\.\d+ s \(ahead, once\); generation \d+ ms, \d+\.\d tokens/s", out.err), out.err
        assert counts == {"lower": 1, "run": 1}, counts
    # a draft checkpoint of another vocabulary (weights never read: the check comes first)
    other = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=70, d_state=8, headdim=16, chunk_size=8)
    zeros = jax.tree_util.tree_map(lambda t: np.zeros(t.shape, t.dtype),
                                   jax.eval_shape(lambda: mamba2.init_params(other, jax.random.key(1))))
    mamba2.save_checkpoint(zeros, other, tmp_path / "other")
    for extra, message in ((["--speculative", str(tmp_path / "other")], "differs from the model's"),
                           (["--draft-tokens", "3"], "goes with --speculative"),
                           (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens must be an integer in"),
                           (["--speculative", str(tmp_path / "none")], f"--speculative {tmp_path / 'none'}: no such"),
                           (["--seed", str(2**64)], "--seed must be an integer in")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err


def test_generate_with_text_prompt(ckpt_with_tokenizer, capsys):
    assert main(["generate", "--model", str(ckpt_with_tokenizer), "--prompt", "w1 w2 w3 w4 w1 w2 w3 w4 w1 w2",
                 "--max-new-tokens", NEW]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_stops_at_a_stop_string(ckpt_with_tokenizer, capsys):
    """--stop: the text ends before the first occurrence of any stop string, which is not printed, and the
    generation ends there. The greedy run of test_generate_with_text_prompt (the same programs) gives the
    text to cut."""
    prompt = "w1 w2 w3 w4 w1 w2 w3 w4 w1 w2"
    args = ["generate", "--model", str(ckpt_with_tokenizer), "--prompt", prompt, "--max-new-tokens", NEW]
    assert main(args) == 0
    text = capsys.readouterr().out[len(prompt):-1]  # the generated text
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    assert main([*args, "--stop", "no such text", "--stop", stop]) == 0
    out = capsys.readouterr()
    assert out.out == prompt + text[:text.index(stop)] + "\n"
    assert re.search(r"\] \d+ tokens \(a --stop string ended them\)", out.err), out.err
    assert int(re.search(r"\] (\d+) tokens", out.err)[1]) < int(NEW)


def test_generate_passes_min_p_and_penalties(ckpt, capsys, monkeypatch):
    """--min-p and the penalty flags reach generate_stream as the library's Sample and Penalties (the stream
    itself is replaced: its penalties are tests/test_generate.py's)."""
    import jax.numpy as jnp

    import ssdkit

    seen = {}

    def stream(*args, **kwargs):
        seen.update(kwargs)
        return iter([jnp.asarray([7], jnp.int32)])

    monkeypatch.setattr(ssdkit, "generate_stream", stream)
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", PROMPT, "--temperature", "0.8", "--min-p", "0.1",
                 "--repetition-penalty", "1.3", "--presence-penalty", "0.5", "--frequency-penalty", "-0.25"]) == 0
    assert capsys.readouterr().out == "7 \n"
    assert seen["sampler"] == ssdkit.Sample(0.8, min_p=0.1)
    assert seen["penalties"] == ssdkit.Penalties(1.3, 0.5, -0.25)


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir", "--prompt-ids", "1"], "no such directory, and not a preset"),
    (["--model", "{ckpt}", "--prompt", "hello"], "needs a tokenizer.json"),
    (["--model", "{ckpt}", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--model", "{ckpt}", "--prompt-ids", "1,999"], "out of range"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--top-p", "1.5"], "--top-p must be a number in"),
    (["--model", "{ckpt}"], "give a prompt"),
    # the sampling flags are checked before the model loads (its directory does not exist)
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--min-p", "1.5"], "--min-p must be a number in [0, 1], got"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--repetition-penalty", "0"],
     "--repetition-penalty must be a finite number > 0"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--presence-penalty", "nan"],
     "--presence-penalty must be a finite number"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--frequency-penalty", "inf"],
     "--frequency-penalty must be a finite number"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", *["--stop", "x"] * 5], "--stop is given at most 4 times, got 5"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--stop", ""], "--stop must be a non-empty string"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--speculative", "lookup", "--stop", "x"],
     "--stop goes with plain decoding, not --speculative"),
    (["--model", "/no/such/dir", "--prompt-ids", "1", "--speculative", "lookup", "--presence-penalty", "1",
      "--repetition-penalty", "2"], "--repetition-penalty, --presence-penalty go with plain decoding, not"),
])
def test_clear_one_line_errors(ckpt, capsys, args, message):
    args = [a.replace("{ckpt}", str(ckpt)) for a in args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("ssdkit generate: error:")


def test_bad_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", "x", "--max-new-tokens", "many"])
    assert exc.value.code == 2


@pytest.mark.parametrize("flag", ["--prompt-len", "--max-new-tokens"])
def test_demo_refuses_a_length_below_one(capsys, flag):
    assert main(["demo", flag, "0"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be an int >= 1, got 0" in err and err.count("\n") == 1, err


def test_demo_runs(capsys):
    assert main(["demo", "--prompt-len", "20", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "retention" in out and "GLA" in out and "tokens/s" in out


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--slots", "0"], "--slots must be a positive integer"),
    (["--snapshot-interval", "0"], "--snapshot-interval must be a positive integer"),
    (["--max-tokens-limit", "0"], "--max-tokens-limit must be a positive integer"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be >= 0"),
    (["--api-key", " "], "--api-key is empty"),
    (["--max-body-kb", "0"], "--max-body-kb must be >= 1"),
    (["--drain-timeout", "-1"], "--drain-timeout must be >= 0"),
    (["--model", "/no/such/dir"], "no such directory, and not a preset"),
])
def test_serve_refuses_bad_flags_in_one_line(capsys, args, message):
    """Each before the server binds or anything compiles."""
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0 and err.startswith("ssdkit serve: error:"), err

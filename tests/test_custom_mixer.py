"""A user's own layer is first-class: tests/custom_mixer.py (a gated delta rule with short convs, outside the
package) trains through ``ssdkit train --arch tests.custom_mixer:GatedDelta``, generates from the exported
folder through ``ssdkit generate`` (speculative decoding: plain greedy's tokens) and is evaluated through
``ssdkit eval`` (the streamed windows: one pass's figures); tests/sharding_check.py runs it on a mesh. A
``--arch`` that names no usable class is one line naming it. Everything runs the tiny shapes of
tests/test_training_cli.py (d_model 32, 1 layer, seq 24, batch 4): one compiled program per kind."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from ssdkit import MixerLM
from ssdkit.models import archs, text
from ssdkit.models.cli import main
from ssdkit.training.data import ByteTokenizer
from tests.helpers import assert_same_greedy_tokens, cli_on_the_suite_cache, greedy_margins

ARCH = "tests.custom_mixer:GatedDelta"
TINY = ["--d-model", "32", "--n-layer", "1", "--d-state", "8", "--headdim", "16", "--chunk-size", "8",
        "--seq-len", "24", "--batch-size", "4", "--no-progress", "--lr", "1e-2", "--warmup-steps", "1"]
#: one prompt (a repeating pattern: prompt lookup finds drafts) and generation length for every greedy run
PROMPT, NEW = [100, 101, 102, 32, 120, 61, 49, 10, 100, 101, 102], 8
TEXTS = ["def f(x):\n    return x + 1\n", "a", "import os\nprint(os.sep)\n"]


@pytest.fixture(autouse=True)
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


def _corpus(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "scan", "chunk", "decay", "token", "layer"]
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 30)) + ".\n")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``ssdkit train --arch tests.custom_mixer:GatedDelta``: 3 steps, nothing held out; OUT/model."""
    root = tmp_path_factory.mktemp("custom")
    out = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        for _ in cli_on_the_suite_cache(mp):
            assert main(["train", "--arch", ARCH, "--data", str(_corpus(root / "docs")), "--out", str(out), *TINY,
                         "--steps", "3", "--save-every", "3", "--held-out", "0"]) == 0
    return out


def test_a_layer_of_its_own_trains_through_the_command(trained):
    record = json.loads((trained / "model" / archs.CHECKPOINT_CONFIG).read_text())
    assert record["arch"] == ARCH and record["mixer"] == {"order": "decay_first"}, record
    log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3] and all(math.isfinite(e["loss"]) for e in log)
    params, model = archs.load_checkpoint(trained / "model")
    assert type(model.mixer).__module__ == "tests.custom_mixer" and model.cfg.num_heads == 4
    assert params.layers.mixer.conv_v.shape == (1, 4, 64)  # (layers, K, H·P): the exported weights, as trained


@pytest.fixture(scope="module")
def ids_only(trained, tmp_path_factory):
    """OUT/model without its tokenizer.json: ``ssdkit generate`` then prints ids and never stops at an EOS."""
    folder = tmp_path_factory.mktemp("ids_only")
    for name in (archs.CHECKPOINT_CONFIG, archs.CHECKPOINT_WEIGHTS):
        (folder / name).write_bytes((trained / "model" / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def logits_of(trained):
    """``logits_of(rows)``: one forward of the exported model over up to 3 token rows, right-padded to 32 (a
    position's logits do not depend on later ones): one compiled program for every test here."""
    params, model = archs.load_checkpoint(trained / "model")
    forward = jax.jit(model.forward)

    def logits(rows):
        batch = np.zeros((3, 32), np.int32)
        for i, row in enumerate(rows):
            batch[i, :len(row)] = row
        return np.asarray(forward(params, batch), np.float64)[:len(rows)]

    return logits


def _generate(capsys, model_dir, *extra) -> tuple[list[int], str]:
    args = ["generate", "--model", str(model_dir), "--prompt-ids", ",".join(map(str, PROMPT)),
            "--max-new-tokens", str(NEW), *extra]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    return [int(t) for t in out.out.split()], out.err


def test_it_generates_speculatively_with_plain_greedy_tokens(ids_only, logits_of, capsys):
    """Plain greedy generation, then ``--speculative lookup`` (its program: this layer's verify and commit, the
    convs' windows and the delta rule's state rolled back): the same tokens up to a near tie (two compiled
    programs: their logits agree to rounding; the margins come from one forward over prompt + generation).
    The command's adaptive rule may decode plainly throughout; ``test_drafts_verified_on_this_layer`` (long)
    makes every round verify drafts."""
    plain, _ = _generate(capsys, ids_only)
    fast, report = _generate(capsys, ids_only, "--speculative", "lookup", "--draft-tokens", "1")
    assert len(plain) == NEW and all(0 <= t < 257 for t in plain), plain
    assert "drafted tokens accepted" in report, report
    margins = greedy_margins(logits_of([PROMPT + plain])[0, len(PROMPT) - 1:len(PROMPT) + NEW - 1])
    assert_same_greedy_tokens(fast, plain, margins, tie=1e-4, name="--speculative lookup")


@pytest.mark.long
def test_drafts_verified_on_this_layer(ids_only, capsys):
    """Speculative decoding that verifies drafts in every round (prompt lookup, 2 drafts, not adaptive; every
    byte is in the prompt, so lookup always proposes), and the checkpoint drafting for itself through the
    command: plain greedy's tokens."""
    import ssdkit

    prompt = list(range(256))
    args = ["generate", "--model", str(ids_only), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens",
            str(NEW)]
    assert main(args) == 0
    plain = [int(t) for t in capsys.readouterr().out.split()]
    params, model = archs.load_checkpoint(ids_only)
    logits = np.asarray(model.forward(params, np.asarray([prompt + plain], np.int32)), np.float64)
    margins = greedy_margins(logits[0, len(prompt) - 1:-1])
    res = ssdkit.generate(model, params, np.asarray([prompt], np.int32), max_new_tokens=NEW,
                          speculative=ssdkit.Speculative(ssdkit.PromptLookup(), draft_tokens=2, adaptive=False))
    assert int(res.speculation.verifies) > 0, res.speculation
    assert_same_greedy_tokens(np.asarray(res.tokens)[0], plain, margins, tie=1e-4, name="verified drafts")
    assert main([*args, "--speculative", str(ids_only), "--draft-tokens", "2"]) == 0
    drafted = [int(t) for t in capsys.readouterr().out.split()]
    assert_same_greedy_tokens(drafted, plain, margins, tie=1e-4, name="--speculative MODEL_DIR")


@pytest.mark.long  # eval's window loop is tests/test_evaluation.py's; this is the mixer checkpoint through it
def test_it_is_evaluated_window_by_window_as_in_one_pass(trained, logits_of, tmp_path):
    """``ssdkit eval`` on three files in windows of 5 over 2 rows (windows shorter than the documents; a row
    takes its next document inside a window; the convs' windows and the state carried between windows):
    the same summed cross-entropy as one forward over each document (float64 log-softmax on the host)."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, t in enumerate(TEXTS):
        (folder / f"{i}.txt").write_text(t)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(trained / "model"), "--text", str(folder), "--window", "5", "--batch", "2",
                 "--no-progress", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    docs = [text.encode_document(ByteTokenizer(), t) for t in TEXTS]
    logits = logits_of([d.ids for d in docs])
    nll = 0.0
    for i, d in enumerate(docs):
        z = logits[i, :len(d.ids) - 1]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= float(np.take_along_axis(logp, d.ids[1:, None].astype(np.int64), -1).sum())
    assert got["tokens"] == sum(len(d.ids) - 1 for d in docs) and got["documents"] == 3
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-5)  # float32 sums of ~60 terms in other orders


@pytest.mark.parametrize("arch,words", [
    ("tests.no_such_module:GatedDelta", ["cannot import tests.no_such_module", "No module named"]),
    ("tests.custom_mixer:Nope", ["tests.custom_mixer has no Nope"]),
    ("tests.custom_mixer:NoCall", ["NoCall is not a mixer: it lacks __call__"]),
    ("tests.custom_mixer:NeedsArguments", ["NeedsArguments() must build with no arguments", "width"]),
    ("tests.custom_mixer:Unhashable", ["Unhashable is not a mixer: it must be hashable"]),
    ("tests.custom_mixer:", ["a custom mixer is given as package.module:Class"]),
])
def test_an_arch_that_names_no_mixer_is_one_line(tmp_path, capsys, arch, words):
    """Each way a ``package.module:Class`` can be wrong: one line naming the arch and what is wrong, exit 2,
    before any data is read or anything written."""
    assert main(["train", "--arch", arch, "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ssdkit train: error:"), err
    assert repr(arch) in err and all(w in err for w in words), err
    assert not (tmp_path / "o").exists()


def test_bad_generate_input_for_a_mixer_checkpoint_is_one_line(trained, tmp_path, capsys):
    """Out-of-vocabulary prompt ids (refused before anything compiles), a mesh of more devices than there are,
    a draft model of another vocabulary, a mixer.json naming a class that is gone: one line each, exit 2."""
    model_dir = trained / "model"
    broken = tmp_path / "broken"
    broken.mkdir()
    record = json.loads((model_dir / archs.CHECKPOINT_CONFIG).read_text())
    (broken / archs.CHECKPOINT_CONFIG).write_text(json.dumps({**record, "arch": "tests.custom_mixer:Gone"}))
    _, model = archs.load_checkpoint(model_dir)
    other = MixerLM(dataclasses.replace(model.cfg, vocab_size=300), model.mixer)  # a draft of 300 ids
    zeros = jax.tree_util.tree_map(lambda t: np.zeros(t.shape, t.dtype), jax.eval_shape(other.init, jax.random.key(0)))
    archs.save_checkpoint(zeros, other, tmp_path / "other")
    for args, words in ((["--model", str(model_dir), "--prompt-ids", "1,257"], ["prompt token id 257", "0..256"]),
                        (["--model", str(model_dir), "--prompt-ids", "1", "--mesh", "model=2"], ["--mesh", "2"]),
                        (["--model", str(broken), "--prompt-ids", "1"],
                         ["mixer.json", "tests.custom_mixer has no Gone"]),
                        (["--model", str(model_dir), "--prompt-ids", "1", "--speculative", str(tmp_path / "other")],
                         ["vocabulary (300 ids) differs from the model's (257)"])):
        assert main(["generate", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("ssdkit generate: error:"), err
        assert all(w in err for w in words), err

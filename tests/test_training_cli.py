"""`ssdkit train`: data in each format, held-out evaluation, exported weights, resumption, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from ssdkit.models import mamba2
from ssdkit.models.cli import main
from ssdkit.models.training import TrainRunConfig, train
from tests.helpers import cli_on_the_suite_cache

# Every Mamba-2 run here (and tests/test_train_checkpoint.py's) trains the same model with the same
# optimiser on batches of the same shape, and evaluates 4 held-out rows: one compiled step (a second for
# a resumed run) and one evaluation program for them all.
TINY = ["--d-model", "32", "--n-layer", "1", "--d-state", "8", "--headdim", "16", "--chunk-size", "8",
        "--seq-len", "24", "--batch-size", "4", "--no-progress", "--lr", "1e-2", "--warmup-steps", "1",
        "--eval-rows", "4"]
STEPS = 4


@pytest.fixture(autouse=True)
def _cli_cache(monkeypatch):
    yield from cli_on_the_suite_cache(monkeypatch)


def _corpus(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "scan", "chunk", "decay", "token", "layer"]
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(words, 30)) + ".\n")
    return folder


def test_train_a_folder_evaluate_export_and_resume(tmp_path, capsys):
    data, out = _corpus(tmp_path), tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), *TINY, "--steps", str(STEPS), "--eval-every", "2",
            "--save-every", "3", "--held-out", "0.2"]  # the last step is saved too, not a multiple of 3
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "held-out loss" in log and "bits/byte" in log and f"done: {STEPS} steps" in log
    straight, cfg = mamba2.load_checkpoint(out / "model")  # transformers-format export
    assert cfg.padded_vocab_size == 272 and cfg.n_layer == 1  # 257 (bytes + <|endoftext|>) padded to 16s
    assert mamba2.load_tokenizer(out / "model").encode("ab").ids == [256, 97, 98]  # shipped with the weights
    run_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in run_log] == list(range(1, STEPS + 1)) and "held_out_bits_per_byte" in run_log[1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "4"]

    # A run killed after its step-3 checkpoint: the same command resumes there and ends where the
    # uninterrupted run ended.
    shutil.rmtree(out / "checkpoints" / "4")
    shutil.rmtree(out / "model")
    assert main(args) == 0
    assert "resuming from step 3" in capsys.readouterr().out
    resumed, _ = mamba2.load_checkpoint(out / "model")
    # Exact: the same compiled step on the same batches (a step's batch depends only on seed and step),
    # from a restored state holding the very bytes that were saved.
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)


def test_config_file_npy_stream_and_flags_override(tmp_path):
    ids = np.random.default_rng(1).integers(0, 50, 600).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    # the stream's last 20%: 5 rows of 24 held out
    (tmp_path / "run.toml").write_text(f'data = "{tmp_path / "ids.npy"}"\nsteps = 99\nseq_len = 24\n'
                                       f'held_out = 0.2\nout = "{tmp_path / "out"}"\n')
    cfg = TrainRunConfig.from_dict({**TrainRunConfig.from_file(tmp_path / "run.toml"), "steps": STEPS})
    assert cfg.steps == STEPS and cfg.seq_len == 24 and cfg.held_out == 0.2
    (tmp_path / "run.json").write_text(json.dumps({"data": str(tmp_path / "ids.npy"), "out": str(tmp_path / "o2"),
                                                   "held_out": 0.2}))
    assert main(["train", "--config", str(tmp_path / "run.json"), *TINY, "--steps", str(STEPS), "--save-every",
                 "2"]) == 0
    _, mcfg = mamba2.load_checkpoint(tmp_path / "o2" / "model")
    assert mcfg.padded_vocab_size == 272  # the byte vocabulary (ids < 256, <|endoftext|>) padded to 16s
    summary = train(dataclasses.replace(cfg, d_model=32, n_layer=1, d_state=8, headdim=16, chunk_size=8,
                                        batch_size=4, lr=1e-2, warmup_steps=1, eval_rows=4, progress=False),
                    log=lambda s: None)
    assert summary.steps == STEPS and np.isfinite(summary.train_loss) and summary.held_out_loss is not None


@pytest.mark.parametrize("argv,message", [
    (["--data", "{tmp}/missing.txt"], "does not exist"),
    (["--data", "{tmp}/docs", "--steps", "0"], "steps must be a positive int"),
    (["--data", "{tmp}/docs", "--remat", "all"], "remat must be one of"),
    (["--data", "{tmp}/docs", "--batch-size", "3", "--micro-batches", "2"], "multiple of micro_batches"),
    (["--data", "{tmp}/docs", "--config", "{tmp}/nope.toml"], "no training config file"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    _corpus(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


# GLA is the same command through the same code (another mixer object and conv width): a long case. Its
# gradients are tests/test_scan.py's (diagonal decay).
@pytest.mark.parametrize("arch", ["retention", pytest.param("gla", marks=pytest.mark.long)])
def test_toy_recurrences_train_with_the_same_command(tmp_path, arch):
    out = tmp_path / arch
    assert main(["train", "--arch", arch, "--data", str(_corpus(tmp_path)), "--out", str(out), *TINY,
                 "--steps", "3", "--eval-every", "3", "--save-every", "3", "--held-out", "0.2"]) == 0
    assert json.loads((out / "model" / "toy.json").read_text())["mixer"] == {"gla": "GLA"}.get(arch, "Retention")
    run_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(run_log[-1]["held_out_loss"]) and run_log[-1]["loss"] < run_log[0]["loss"] + 1.0


def test_toy_arch_refuses_mamba2_checkpoints(tmp_path, capsys):
    assert main(["train", "--arch", "gla", "--model", "130m", "--data", str(_corpus(tmp_path)),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not for arch=gla" in capsys.readouterr().err

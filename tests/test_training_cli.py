"""`ssdkit train`: data in each format, held-out evaluation, exported weights, resumption, bad input."""

from __future__ import annotations

import dataclasses
import itertools
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
    # --compute-dtype auto (the default), resolved, logged and recorded (tests/conftest.py pins float32 products)
    assert "compute dtype auto: float32 (SSDKIT_HALF_MATMUL=float32)" in log and "(float32 compute)" in log
    record = json.loads((out / "model" / "training.json").read_text())
    segment = {"from_step": 0, "setting": "auto", "weights": "float32", "products": "float32"}
    assert record["run"]["compute_dtype"] == "auto" and record["compute"] == [segment]
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
    assert json.loads((out / "model" / "training.json").read_text())["compute"] == [segment]  # one segment still
    # Exact: the same compiled step on the same batches (a step's batch depends only on seed and step),
    # from a restored state holding the very bytes that were saved.
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed, straight)
    # The log goes on where the checkpoint was: steps 1..4 once each, tokens counted over the whole run
    resumed_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in resumed_log] == list(range(1, STEPS + 1))
    assert [e["tokens"] for e in resumed_log] == [e["tokens"] for e in run_log] == [96 * s for s in range(1, 5)]
    assert all(a["seconds"] <= b["seconds"] for a, b in itertools.pairwise(resumed_log))


def test_resume_refuses_another_run_and_extends_on_request(tmp_path, capsys):
    """A checkpoint records the run's settings and its data's fingerprint: another --lr, other data or
    another --steps is refused by name; a finished run says so and trains nothing; --extend trains further
    at the schedule's final learning rate."""
    data, out = _corpus(tmp_path), tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), *TINY, "--steps", str(STEPS), "--eval-every", "2",
            "--save-every", "3", "--held-out", "0.2"]
    assert main(args) == 0
    assert "compiling the train step..." in capsys.readouterr().out
    assert main(args) == 0
    assert f"already finished its {STEPS} steps: nothing to train" in capsys.readouterr().out
    # the compute dtype is how a run executes, not what it computes: another one resumes (here: finds it done)
    assert main([*args, "--compute-dtype", "bfloat16"]) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert main([*args, "--lr", "2e-2"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with other settings: lr 0.01 -> 0.02" in err and err.count("\n") == 1, err
    (data / "doc00.txt").write_text("other words entirely.\n")
    assert main(args) == 2
    assert "the data (" in capsys.readouterr().err
    shutil.rmtree(data)
    data = _corpus(tmp_path)
    assert main([*args, "--steps", "6"]) == 2
    assert "holds a run of 4 steps (at step 4): --steps 6 would change" in capsys.readouterr().err
    assert main([*args, "--steps", "6", "--extend"]) == 0
    assert "extended from 4 to 6 steps" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7))
    lr_end = 1e-2 * 0.1  # min_lr_ratio x lr: the 4-step schedule's end, held
    assert log[3]["lr"] > lr_end and all(e["lr"] == pytest.approx(lr_end) for e in log[4:]), log
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "6"


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch):
    """SIGINT during a run: the step in flight finishes and is saved, one line says where the next run
    resumes, exit 130; the same command then resumes there."""
    import os
    import signal

    from ssdkit.models import training

    real = training._progress

    def progress_that_interrupts(cfg, start):
        update = real(cfg, start)

        def on_step(step, postfix):
            if step == 2 and start == 0:
                os.kill(os.getpid(), signal.SIGINT)
            return update(step, postfix)

        return on_step

    monkeypatch.setattr(training, "_progress", progress_that_interrupts)
    data, out = _corpus(tmp_path), tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), *TINY, "--steps", str(STEPS), "--eval-every", "2",
            "--save-every", "3", "--held-out", "0.2"]
    assert main(args) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted after step 2" in err[0] and "checkpoint of step 2" in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2"]
    assert main(args) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, STEPS + 1)) and log[-1]["tokens"] == 96 * STEPS


def test_log_is_standard_json_with_a_non_finite_loss(tmp_path, monkeypatch):
    """A step whose loss is NaN (skipped by the step) is logged as null, so that every line of log.jsonl is
    standard JSON; the loss curve is drawn around it, and a torn last line (a kill while writing) is
    left out when the log is read."""
    from ssdkit.models import training

    real = training.make_step

    def make_step_with_a_nan_loss(*args, **kwargs):
        jitted = real(*args, **kwargs)

        class Lowered:
            def __init__(self, lowered):
                self.lowered = lowered

            def compile(self):
                compiled, calls = self.lowered.compile(), []

                def step(state, batch):
                    state, m = compiled(state, batch)
                    calls.append(None)
                    return state, (dataclasses.replace(m, loss=m.loss * np.nan) if len(calls) == 2 else m)

                return step

        return type("Step", (), {"lower": lambda self, *a: Lowered(jitted.lower(*a))})()

    monkeypatch.setattr(training, "make_step", make_step_with_a_nan_loss)
    out = tmp_path / "run"
    assert main(["train", "--data", str(_corpus(tmp_path)), "--out", str(out), *TINY, "--steps", str(STEPS),
                 "--eval-every", "2", "--save-every", "3", "--held-out", "0.2"]) == 0
    lines = (out / "log.jsonl").read_text().splitlines()
    entries = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl")) for line in lines]
    assert entries[1]["loss"] is None and all(e["loss"] is not None for e in entries[:1] + entries[2:])
    assert (out / "loss.png").stat().st_size > 0
    (out / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')
    assert [e["step"] for e in training.read_log(out / "log.jsonl")] == list(range(1, STEPS + 1))


def test_every_flag_has_a_line_of_help(capsys):
    """Every option of every subcommand says what it does; train's are grouped, with two examples."""
    from ssdkit.models.cli import build_parser
    from ssdkit.models.training import HELP

    assert set(HELP) == {f.name for f in dataclasses.fields(TrainRunConfig)}
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and "train" in a.choices)
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help and not action.help.startswith("default"), (name, action.option_strings)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert all(f"\n{g}:\n" in text for g in ("data", "model", "optimiser", "run", "mesh"))
    assert "a first run, about a minute" in text and "configs/mamba2-python-bpe.toml" in text


def test_a_mesh_larger_than_the_devices_says_how_to_get_host_devices(tmp_path, capsys):
    assert main(["train", "--data", str(_corpus(tmp_path)), "--out", str(tmp_path / "o"), *TINY, "--steps", "1",
                 "--mesh", "data=3"]) == 2
    err = capsys.readouterr().err
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=3" in err and err.count("\n") == 1, err


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
    (["--data", "{tmp}/docs", "--steps", "0"], "steps must be an int >= 1, got 0"),
    (["--data", "{tmp}/docs", "--lr=-1e-3"], "lr must be a finite number in (0, 1], got -0.001"),
    (["--data", "{tmp}/docs", "--lr", "0"], "lr must be a finite number in (0, 1], got 0.0"),
    (["--data", "{tmp}/docs", "--lr", "nan"], "lr must be a finite number in (0, 1], got nan"),
    (["--data", "{tmp}/docs", "--weight-decay", "inf"], "weight_decay must be a finite number in [0, 1], got inf"),
    (["--data", "{tmp}/docs", "--min-lr-ratio", "1.5"], "min_lr_ratio must be a finite number in [0, 1]"),
    (["--data", "{tmp}/docs", "--b2", "1"], "b2 must be a finite number in [0, 1), got 1.0"),
    (["--data", "{tmp}/docs", "--clip-norm", "0"], "clip_norm must be a finite number in (0, inf)"),
    (["--data", "{tmp}/docs", "--warmup-steps", "-1"], "warmup_steps must be an int >= 0, got -1"),
    (["--data", "{tmp}/docs", "--held-out", "1"], "held_out must be a finite number in [0, 1), got 1.0"),
    (["--config", "{tmp}/lr.toml"], "{tmp}/lr.toml: lr must be a number, got '3e-3' (str)"),
    (["--config", "{tmp}/held.toml"], "{tmp}/held.toml: held_out must be a number, got '0.1' (str)"),
    (["--config", "{tmp}/steps.json"], "{tmp}/steps.json: steps must be an int, got 2.5 (float)"),
    (["--data", "{tmp}/docs", "--out", "{tmp}/docs/doc00.txt"], "--out {tmp}/docs/doc00.txt is a file, not a folder"),
    (["--data", "{tmp}/docs", "--out", "{tmp}/docs/doc00.txt/run"],
     "--out {tmp}/docs/doc00.txt/run cannot be created: {tmp}/docs/doc00.txt is a file"),
    (["--data", "{tmp}/docs", "--extend"], "--extend: no checkpoint in"),
    (["--data", "{tmp}/docs", "--remat", "all"], "remat must be one of"),
    (["--data", "{tmp}/docs", "--compute-dtype", "float16"],
     "compute_dtype must be one of auto, float32, bfloat16, got 'float16'"),
    (["--data", "{tmp}/docs", "--batch-size", "3", "--micro-batches", "2"], "multiple of micro_batches"),
    (["--data", "{tmp}/docs", "--config", "{tmp}/nope.toml"], "no training config file"),
    (["--data", "{tmp}/docs", "--tokenizer", "bpe:100"], "tokenizer 'bpe:100': bpe:N needs N in 258..65536"),
    (["--data", "{tmp}/docs", "--tokenizer", "bpe:lots"], "bpe:N needs N in 258..65536"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    """One line naming the setting (its allowed range, or a config file's key, type and value), exit 2,
    and nothing written."""
    _corpus(tmp_path)
    (tmp_path / "lr.toml").write_text(f'data = "{tmp_path / "docs"}"\nlr = "3e-3"\n')
    (tmp_path / "held.toml").write_text(f'data = "{tmp_path / "docs"}"\nheld_out = "0.1"\n')
    (tmp_path / "steps.json").write_text(json.dumps({"data": str(tmp_path / "docs"), "steps": 2.5}))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "o")]
    assert main(["train", *argv, *out, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_a_bpe_learnt_from_the_training_split_ships_with_the_model(tmp_path, capsys):
    """``--tokenizer bpe:N``: a BPE learnt from the training documents only, written beside the run and
    exported with the weights; bits per byte still counts the files' bytes; a resumed run reads it back."""
    from ssdkit.models import evaluation, text
    from ssdkit.models.training import load_tokenizer
    from ssdkit.training.data import split_documents

    data, out = _corpus(tmp_path), tmp_path / "run"
    (data / "doc00.txt").write_text("zyxwvut " * 400)  # a document whose pairs are the most frequent
    args = ["train", "--data", str(data), "--out", str(out), *TINY, "--steps", "2", "--eval-every", "2",
            "--held-out", "0.2", "--tokenizer", "bpe:272"]  # 272 ids: the byte runs' padded shapes and programs
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "learnt a BPE of 272 ids" in log and "bits/byte" in log
    tok = mamba2.load_tokenizer(out / "model")
    assert tok.get_vocab_size() == 272 and tok.to_str() == mamba2.load_tokenizer(out / "tokenizer.json").to_str()
    assert tok.encode("ab").ids == [256, 97, 98]  # bytes keep their ids, <|endoftext|> in front
    files = evaluation.text_files(data)
    _, held_idx = split_documents(len(files), 0.2, 0)  # the run's split of the 12 files
    learnt = any("zyx" in t for t in tok.get_vocab())
    assert learnt == (0 not in held_idx)  # merges only from text the tokenizer may see: the training split
    said = []
    again, _ = load_tokenizer(TrainRunConfig(data=str(data), out=str(out), tokenizer="bpe:272"), log=said.append)
    assert again.to_str() == tok.to_str() and "the run's BPE tokenizer" in said[0]  # a resumed run's
    docs = list(evaluation.read_documents(files[:2], tok))
    assert [d.num_bytes for d in docs] == [f.stat().st_size for f in files[:2]]
    assert all(text.eod_id(tok) == d.ids[-1] == d.ids[0] for d in docs)


# GLA is the same command through the same code (another mixer object and conv width): a long case. Its
# gradients are tests/test_scan.py's (diagonal decay).
@pytest.mark.parametrize("arch", ["retention", pytest.param("gla", marks=pytest.mark.long)])
def test_toy_recurrences_train_with_the_same_command(tmp_path, arch):
    out = tmp_path / arch
    assert main(["train", "--arch", arch, "--data", str(_corpus(tmp_path)), "--out", str(out), *TINY,
                 "--steps", "3", "--eval-every", "3", "--save-every", "3", "--held-out", "0.2"]) == 0
    assert json.loads((out / "model" / "mixer.json").read_text())["arch"] == arch
    run_log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert np.isfinite(run_log[-1]["held_out_loss"]) and run_log[-1]["loss"] < run_log[0]["loss"] + 1.0


def test_toy_arch_refuses_mamba2_checkpoints(tmp_path, capsys):
    assert main(["train", "--arch", "gla", "--model", "130m", "--data", str(_corpus(tmp_path)),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not for arch=gla" in capsys.readouterr().err


# ------------------------------------------------------------------ the bytes of the files (issue 23, items 1, 15, 16)
LATIN1 = ("caf\xe9 na\xefve r\xe9sum\xe9\n" * 8).encode("latin-1")  # not UTF-8: é, ï are single bytes


def _binary_files(folder):
    """A compiled module and an image: not text (a NUL byte in their first bytes), skipped in folders."""
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00" + bytes(range(256)))
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40))


def test_a_non_utf8_file_trains_on_its_bytes(tmp_path):
    """The byte tokenizer sees the file's bytes, all of them and nothing else (no U+FFFD's EF BF BD)."""
    from ssdkit.models import training
    from ssdkit.training.data import ByteTokenizer

    (tmp_path / "l1.txt").write_bytes(LATIN1)
    cfg = TrainRunConfig(data=str(tmp_path / "l1.txt"), seq_len=24, held_out=0.0)
    train_docs, held_docs, _ = training.load_documents(cfg, ByteTokenizer())
    assert held_docs == [] and len(train_docs) == 1 and train_docs[0].num_bytes == len(LATIN1)
    ids = [ByteTokenizer.eod_id, *LATIN1, ByteTokenizer.eod_id]
    assert train_docs[0].ids.tolist() == ids
    rows, _ = training.prepare_data(cfg, train_docs, held_docs)
    assert rows.tokens.ravel().tolist() == ids[:rows.tokens.size] and rows.tokens.size == len(ids) // 24 * 24


def test_a_folder_skips_binaries_and_exports_files_alike(tmp_path, capsys, monkeypatch):
    """A folder's .pyc and image are skipped (and counted); a latin-1 file is one of its documents; the exported
    files all get the usual mode (safetensors writes through a private temporary file); without matplotlib the
    hint names both installs."""
    import os
    import stat

    from ssdkit.models import training

    data, out = _corpus(tmp_path), tmp_path / "run"
    (data / "l1.txt").write_bytes(LATIN1)
    _binary_files(data)

    def no_matplotlib(*args):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(training, "plot_log", no_matplotlib)
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--steps", str(STEPS), "--eval-every", "2",
                 "--save-every", "3", "--held-out", "0.2"]) == 0
    log = capsys.readouterr().out
    assert f"{data}: 13 text files taken, 2 skipped" in log and "m.cpython-311.pyc, logo.png" in log
    assert "pip install 'ssdkit[bench]'" in log and "pip install -e '.[bench]'" in log
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "model").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize("setup,argv,words", [
    (lambda d: (d / "empty.txt").write_bytes(b""), ["--data", "{d}/empty.txt"], ["no text in", "empty"]),
    (lambda d: ((d / "a.txt").write_bytes(b""), _binary_files(d)), ["--data", "{d}"], ["no text in", "all empty"]),
    (_binary_files, ["--data", "{d}"], ["no text files under", "2 files skipped"]),
    (_binary_files, ["--data", "{d}/logo.png"], ["logo.png is not a text file", "NUL byte at offset 8"]),
    # a tokenizer.json that is not the byte tokenizer's needs text: strict UTF-8 refuses a latin-1 file
    (lambda d: ((d / "l1.txt").write_bytes(LATIN1), (d / "tok.json").write_text(
        json.dumps({**__import__("ssdkit").training.data.ByteTokenizer.tokenizers_json(),
                    "normalizer": {"type": "NFC"}}))),
     ["--data", "{d}/l1.txt", "--tokenizer", "{d}/tok.json"], ["l1.txt: byte 3", "not valid utf-8", "--encoding"]),
    (lambda d: (d / "a.txt").write_text("text"), ["--data", "{d}/a.txt", "--encoding", "utf-9"], ["utf-9"]),
    (lambda d: (d / "a.txt").write_text("text"), ["--data", "{d}/a.txt", "--errors", "namereplace"],
     ["namereplace", "strict"]),
])
def test_bad_data_is_one_clear_line_and_leaves_nothing(tmp_path, capsys, setup, argv, words):
    data = tmp_path / "data"
    data.mkdir()
    setup(data)
    argv = [a.replace("{d}", str(data)) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("ssdkit train: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o").exists()  # no model/, no checkpoints


def test_bench_plot_without_matplotlib_says_how_to_install_before_measuring(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib.util.find_spec: not installed
    assert main(["bench", "--plot", "roofline.png"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--plot needs matplotlib" in err, err
    assert "pip install 'ssdkit[bench]'" in err and "pip install -e '.[bench]'" in err

"""Streaming evaluation (`ssdkit eval`): windows carrying state equal one pass, and a direct computation
from `forward`; the byte tokenizer and its tokenizer.json agree."""

from __future__ import annotations

import contextlib
import json
import math

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer

from ssdkit.models import evaluation, mamba2, text
from ssdkit.models.cli import main
from ssdkit.training.data import ByteTokenizer

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=8, headdim=16, chunk_size=8)
TEXTS = ["def f(x):\n    return x + 1\n", "a", "", "naïve – ok 日本 😀\n" * 3, "import os\n\n\nprint(os.sep)\n" * 4]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(params, cfg, folder): a random model saved as `ssdkit eval --model` reads it, and loaded back, so
    that the tests and the CLI run the same compiled programs (the loaded config records the padded vocab)."""
    folder = tmp_path_factory.mktemp("model")
    mamba2.save_checkpoint(mamba2.init_params(CFG, jax.random.key(0)), CFG, folder)
    (folder / "tokenizer.json").write_text(json.dumps(ByteTokenizer.tokenizers_json()))
    params, cfg = mamba2.load_checkpoint(folder)
    return params, cfg, folder


@pytest.fixture(scope="module")
def params(model):
    return model[0]


def _direct(params, cfg, docs) -> list[tuple[float, int]]:
    """(Σ nll, number of targets) of each document, from the full logits of `forward` (float64 log-softmax
    on the host). All documents in one batch, right-padded: a position's logits do not depend on later
    tokens, so each document's are those of the document alone."""
    width = max(len(d.ids) for d in docs)
    batch = np.zeros((len(docs), width), np.int32)
    for i, d in enumerate(docs):
        batch[i, :len(d.ids)] = d.ids
    logits = np.asarray(mamba2.forward(params, cfg, batch), np.float64)
    out = []
    for i, d in enumerate(docs):
        if len(d.ids) < 2:
            out.append((0.0, 0))
            continue
        z = logits[i, :len(d.ids) - 1]
        logp = z - z.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        out.append((-float(np.take_along_axis(logp, d.ids[1:, None].astype(np.int64), -1).sum()), len(d.ids) - 1))
    return out


@pytest.fixture(scope="module")
def direct(model):
    params, cfg, _ = model
    return _direct(params, cfg, [text.encode_document(ByteTokenizer(), t) for t in TEXTS])


def _evaluate_equals_forward(model, direct, window, batch):
    docs = [text.encode_document(ByteTokenizer(), t) for t in TEXTS]
    ref_nll, ref_n = sum(d[0] for d in direct), sum(d[1] for d in direct)
    windows = []
    got = evaluation.evaluate(model[0], model[1], docs, window=window, batch=batch, progress=windows.append)
    assert got.tokens == ref_n and sum(windows) == ref_n, (window, batch)
    assert got.documents == len(docs)
    assert got.num_bytes == sum(len(t.encode()) for t in TEXTS)
    # float32 sums of a few hundred terms computed in different orders: 1e-5 relative
    np.testing.assert_allclose(got.nll, ref_nll, rtol=1e-5, err_msg=f"window={window} batch={batch}")
    assert math.isclose(got.bits_per_byte, got.nll / math.log(2) / got.num_bytes)
    assert math.isclose(got.perplexity, math.exp(got.nll / got.tokens))
    return len(windows)


# Every window shape is a compiled program (~2.5 CPU-s). Windows of 5 in 8 rows: more rows than documents;
# row 1 takes a second and a third document while it runs short of a window, the third starting exactly at a
# window's first token (after 3 + 2 tokens); windows shorter than a document and not dividing it. The CLI
# test below reads the same windows (its default 8 rows).
@pytest.mark.numerics
def test_windows_and_rows_equal_forward(model, direct):
    _evaluate_equals_forward(model, direct, 5, 8)


# One pass (a window longer than the 220 tokens), all documents in one row, other windows: the same
# mechanisms, long.
@pytest.mark.long
@pytest.mark.numerics
@pytest.mark.parametrize(("window", "batch"), [(256, 1), (8, 1), (8, 8), (7, 1), (5, 3), (16, 2), (1, 4), (3, 8)])
def test_more_windows_and_rows_equal_forward(model, direct, window, batch):
    n = _evaluate_equals_forward(model, direct, window, batch)
    assert window < 220 or n == 1  # one window: one pass


def test_byte_tokenizer_json_equals_byte_tokenizer():
    tok = Tokenizer.from_str(json.dumps(ByteTokenizer.tokenizers_json()))
    bt = ByteTokenizer()
    for t in [*TEXTS, "", "\r\n\t  x", "\x00\x7f\u0080\uffff"]:
        assert tok.encode(t).ids == bt.encode(t).tolist()
        assert tok.decode(tok.encode(t).ids) == t == bt.decode(bt.encode(t))
    assert tok.token_to_id(text.EOD_TOKEN) == ByteTokenizer.eod_id
    doc = text.encode_document(bt, "ab")
    assert doc.ids.tolist() == [256, 97, 98, 256] and doc.num_bytes == 2


def test_stream_decoder_holds_back_split_characters():
    bt = ByteTokenizer()
    ids = bt.encode("é😀x")
    dec = text.StreamDecoder(bt)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == "é😀x" and "\ufffd" not in "".join(pieces)
    assert pieces[:2] == ["", ""]  # <|endoftext|>, then the first byte of é


@contextlib.contextmanager
def _jax_cache_config_kept():
    """The CLI points JAX's persistent compilation cache at the user's cache folder (and raises its minimum
    compile time) for the rest of the process: put the test run's settings back afterwards."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    saved = {n: getattr(jax.config, n) for n in names}
    try:
        yield
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)


@pytest.mark.numerics
def test_eval_cli_on_a_tiny_file_equals_forward(model, direct, tmp_path, capsys):
    model = model[2]
    (tmp_path / "tiny.py").write_text(TEXTS[0])
    out = tmp_path / "result.json"
    with _jax_cache_config_kept():
        assert main(["eval", "--model", str(model), "--text", str(tmp_path / "tiny.py"), "--window", "5",
                     "--no-progress", "--json", str(out)]) == 0
    assert "bits/byte" in capsys.readouterr().out
    got = json.loads(out.read_text())
    ref_nll, ref_n = direct[0]
    assert got["tokens"] == ref_n == len(TEXTS[0].encode()) + 1  # every byte and the end of the file
    np.testing.assert_allclose(got["nll"], ref_nll, rtol=1e-5)
    np.testing.assert_allclose(got["bits_per_byte"], ref_nll / math.log(2) / len(TEXTS[0].encode()), rtol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--text", "/nonexistent/file"], "no such file or folder"),
    (["--text", "python-stdlib:held-out", "--window", "0"], "--window and --batch must be >= 1"),
])
def test_eval_cli_errors(tmp_path, capsys, args, message):
    assert main(["eval", *args]) == 2
    assert message in capsys.readouterr().err


def test_out_of_range_ids_are_refused(params):
    bad = text.Document(np.array([1, 2, CFG.padded_vocab_size], np.int32), 3)
    with pytest.raises(ValueError, match="out of range"):
        evaluation.evaluate(params, CFG, [bad])
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluation.evaluate(params, CFG, [])

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

from ssdkit.models import archs, evaluation, mamba2, text
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
# window's first token (after 3 + 2 tokens); windows shorter than a document and not dividing it. Rows run dry
# and leave the batch (4 rows computed, then 2, then 1: three programs, the states of the rows kept moved
# along). The CLI test below reads one file (its default 8 rows: one row computed, the 1-row program).
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


def test_rows_without_documents_are_not_computed(model, monkeypatch):
    """One document in 8 rows is read in one row (the issue's 8x: seven rows of padding per window); rows
    that run dry once every document is taken leave the batch (a program for fewer rows: a power of two, or
the batch);
    a stream's last token alone (the window before's last target) takes no window: 106 tokens in windows
    of 5 are 21 windows."""
    rows = []
    score = archs.Mamba2Family.score_window

    def spy(params, cfg, tokens, *args, **kwargs):
        rows.append(tokens.shape[0])
        return score(params, cfg, tokens, *args, **kwargs)

    monkeypatch.setattr(archs.Mamba2Family, "score_window", staticmethod(spy))
    docs = [text.encode_document(ByteTokenizer(), t) for t in TEXTS]
    assert len(docs[4].ids) == 106
    evaluation.evaluate(model[0], model[1], docs[4:], window=5, batch=8)
    assert rows == [1] * 21
    rows.clear()
    evaluation.evaluate(model[0], model[1], docs, window=5, batch=8)
    # rows of 29 | 3 + 2 + 80 | 106 tokens: 3 live rows (4 computed), then 2, then 1 (the last 4 windows)
    assert rows == [4] * 6 + [2] * 11 + [1] * 4, rows


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


# ------------------------------------------------------------------ the bytes of the files (issue 23, items 1, 2)
LATIN1 = ("caf\xe9 na\xefve r\xe9sum\xe9\n" * 2).encode("latin-1")  # not UTF-8: é, ï are single bytes


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("ssdkit eval: error:") and all(w in err for w in words), err
    return err


def _binary_files(folder):
    """A compiled module and an image: not text (a NUL byte in their first bytes), skipped in folders."""
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\xa7\r\r\n\x00\x00\x00\x00" + bytes(range(256)))
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(40))


def test_eval_cli_counts_the_real_bytes_of_a_latin1_file_and_skips_binaries(model, params, tmp_path, capsys):
    """The byte model reads the file's bytes: its byte count and bits per byte are over its real size, and its
    ids are the bytes (the same nll as the bytes scored directly); a folder's binary files are skipped."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "l1.txt").write_bytes(LATIN1)
    _binary_files(folder)
    out = tmp_path / "result.json"
    with _jax_cache_config_kept():  # the programs of test_eval_cli_on_a_tiny_file_equals_forward (window 5, 8 rows)
        assert main(["eval", "--model", str(model[2]), "--text", str(folder), "--window", "5", "--no-progress",
                     "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 files, 36 bytes" in captured.out and "1 text files taken, 2 skipped" in captured.err
    got = json.loads(out.read_text())
    assert got["num_bytes"] == len(LATIN1) == 36 and got["tokens"] == len(LATIN1) + 1 and got["documents"] == 1
    direct = evaluation.evaluate(params, model[1], [text.encode_document(ByteTokenizer(), LATIN1)], window=5, batch=8)
    assert direct.num_bytes == len(LATIN1)
    np.testing.assert_allclose(got["nll"], direct.nll, rtol=1e-6)
    np.testing.assert_allclose(got["bits_per_byte"], direct.nll / math.log(2) / len(LATIN1), rtol=1e-6)


def test_a_text_tokenizer_refuses_undecodable_bytes_or_decodes_as_told(model, tmp_path, capsys):
    """A tokenizer.json that is not the byte tokenizer's needs text: strict UTF-8 refuses the file (its name
    and the byte offset, pointing at --encoding/--errors); --encoding latin-1 reads it, over its real size."""
    desc = ByteTokenizer.tokenizers_json()
    desc["normalizer"] = {"type": "NFC"}  # another tokenizer (the same ids here), not the byte one
    (tmp_path / "tokenizer.json").write_text(json.dumps(desc))
    (tmp_path / "l1.txt").write_bytes(LATIN1)
    assert isinstance(text.load(tmp_path)[0], Tokenizer)
    args = ["eval", "--model", str(model[2]), "--tokenizer", str(tmp_path / "tokenizer.json"),
            "--text", str(tmp_path / "l1.txt"), "--window", "5", "--no-progress"]
    with _jax_cache_config_kept():
        assert main(args) == 2
        _one_line_error(capsys, "l1.txt", "byte 3", "not valid utf-8", "--encoding", "--errors")
        assert main([*args, "--encoding", "latin-1", "--json", str(tmp_path / "r.json")]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["num_bytes"] == len(LATIN1)  # the file's size, not its UTF-8 text's (é, ï: 2 bytes each)
    assert got["tokens"] == len(LATIN1.decode("latin-1").encode()) + 1  # byte-level BPE of the decoded text


@pytest.mark.parametrize("setup,args,words", [
    (lambda d: (d / "empty.txt").write_bytes(b""), ["--text", "{d}/empty.txt"], ["nothing to evaluate", "empty"]),
    (lambda d: ((d / "a.txt").write_bytes(b""), (d / "b.txt").write_bytes(b""), _binary_files(d)), ["--text", "{d}"],
     ["nothing to evaluate", "all empty"]),
    (_binary_files, ["--text", "{d}"], ["no text files under", "2 files skipped"]),
    (_binary_files, ["--text", "{d}/logo.png"], ["logo.png is not a text file", "NUL byte at offset 8"]),
    (lambda d: None, ["--text", "{d}", "--encoding", "utf-9"], ["--encoding must be a text codec", "utf-9"]),
    (lambda d: None, ["--text", "{d}", "--errors", "xmlcharrefreplace"], ["--errors must be one of", "strict"]),
])
def test_eval_cli_refuses_input_with_nothing_to_measure(tmp_path, capsys, setup, args, words):
    """Before any model loads: one line, exit 2."""
    setup(tmp_path)
    assert main(["eval", *[a.replace("{d}", str(tmp_path)) for a in args], "--no-progress"]) == 2
    _one_line_error(capsys, *words)


def test_documents_of_no_bytes_are_refused(model, params):
    """evaluate() itself: documents holding no bytes (empty files: <|endoftext|> twice) give no bits per byte."""
    empty = text.encode_document(ByteTokenizer(), b"")
    assert empty.ids.tolist() == [256, 256] and empty.num_bytes == 0
    with pytest.raises(ValueError, match="no bytes"):
        evaluation.evaluate(params, model[1], [empty, empty], window=5, batch=8)

"""Streaming evaluation (`ssdkit eval`): windows carrying state equal one pass, and a direct computation
from `forward`; the byte tokenizer and its tokenizer.json agree."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from ssdkit.models import evaluation, mamba2, text
from ssdkit.models.cli import main
from ssdkit.training.data import ByteTokenizer

# Compares floats from compiled programs: rerun with XLA_FLAGS=--xla_cpu_max_isa=AVX2 (README).
pytestmark = pytest.mark.numerics

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=257, d_state=8, headdim=16, chunk_size=8)
TEXTS = ["def f(x):\n    return x + 1\n", "a", "", "naïve – ok 日本 😀\n" * 3, "import os\n\n\nprint(os.sep)\n" * 4]


@pytest.fixture(scope="module")
def params():
    return mamba2.init_params(CFG, jax.random.key(0))


def _direct(params, docs) -> tuple[float, int]:
    """Σ nll and the number of targets, document by document from the full logits of `forward`."""
    nll, n = 0.0, 0
    for d in docs:
        if len(d.ids) < 2:
            continue
        logits = mamba2.forward(params, CFG, jnp.asarray(d.ids[None]))[0, :-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits, axis=-1)
        nll -= float(jnp.sum(jnp.take_along_axis(logp, jnp.asarray(d.ids[1:, None]), axis=-1)))
        n += len(d.ids) - 1
    return nll, n


def test_windows_and_rows_equal_one_pass_and_forward(params):
    docs = [text.encode_document(ByteTokenizer(), t) for t in TEXTS]
    ref_nll, ref_n = _direct(params, docs)
    one = evaluation.evaluate(params, CFG, docs, window=4096, batch=1)
    assert one.tokens == ref_n and one.documents == len(docs)
    assert one.num_bytes == sum(len(t.encode()) for t in TEXTS)
    # float32 sums of a few hundred terms computed in different orders: 1e-5 relative
    np.testing.assert_allclose(one.nll, ref_nll, rtol=1e-5)
    # windows shorter than a document, not dividing it, a document starting exactly at a window's first
    # token, several documents per row: the same sums
    for window, batch in ((7, 1), (5, 3), (16, 2), (1, 4), (3, 8)):  # (3, 8): more rows than documents
        many = evaluation.evaluate(params, CFG, docs, window=window, batch=batch)
        assert many.tokens == ref_n, (window, batch)
        np.testing.assert_allclose(many.nll, one.nll, rtol=1e-5, err_msg=f"window={window} batch={batch}")
    assert math.isclose(one.bits_per_byte, one.nll / math.log(2) / one.num_bytes)
    assert math.isclose(one.perplexity, math.exp(one.nll / one.tokens))


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


def test_eval_cli_on_a_tiny_file_equals_forward(params, tmp_path, capsys):
    model = tmp_path / "model"
    mamba2.save_checkpoint(params, CFG, model)
    (model / "tokenizer.json").write_text(json.dumps(ByteTokenizer.tokenizers_json()))
    (tmp_path / "tiny.py").write_text(TEXTS[0])
    out = tmp_path / "result.json"
    assert main(["eval", "--model", str(model), "--text", str(tmp_path / "tiny.py"), "--window", "8",
                 "--no-progress", "--json", str(out)]) == 0
    assert "bits/byte" in capsys.readouterr().out
    got = json.loads(out.read_text())
    ref_nll, ref_n = _direct(params, [text.encode_document(ByteTokenizer(), TEXTS[0])])
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

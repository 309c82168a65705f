"""The ``ssdkit`` command line on a tiny checkpoint made here (no hub, no network)."""

from __future__ import annotations

import jax
import pytest

from ssdkit.models import mamba2
from ssdkit.models.cli import main

CFG = mamba2.Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=16, chunk_size=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    mamba2.save_checkpoint(mamba2.init_params(CFG, jax.random.key(0)), CFG, path)
    return path


@pytest.fixture(scope="module")
def ckpt_with_tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("ckpt_tok")
    mamba2.save_checkpoint(mamba2.init_params(CFG, jax.random.key(0)), CFG, path)
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SSDKIT_CACHE_DIR", str(tmp_path / "xla"))


def test_generate_with_prompt_ids(ckpt, capsys):
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    ids = [int(t) for t in out.out.split()]
    assert len(ids) == 5 and all(0 <= i < CFG.padded_vocab_size for i in ids)
    assert "tokens/s" in out.err
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--seed", "3",
                 "--dtype", "bfloat16"]) == 0


def test_generate_with_text_prompt(ckpt_with_tokenizer, capsys):
    assert main(["generate", "--model", str(ckpt_with_tokenizer), "--prompt", "w1 w2 w3",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_generate_speculative(ckpt, tmp_path, capsys):
    """--speculative lookup and --speculative DIR (the checkpoint drafting for itself): plain greedy's tokens
    (one compiled program each, so equal barring a near tie: none at these 12 steps), and the report."""
    args = ["generate", "--model", str(ckpt), "--prompt-ids", "1,2,3,4,1,2,3,4,1,2", "--max-new-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out.split()
    for draft in ("lookup", str(ckpt)):
        assert main([*args, "--speculative", draft, "--draft-tokens", "2"]) == 0
        out = capsys.readouterr()
        assert out.out.split() == plain
        assert "drafted tokens accepted" in out.err and "tokens per weight pass" in out.err
    other = mamba2.Mamba2Config(d_model=32, n_layer=1, vocab_size=70, d_state=8, headdim=16, chunk_size=8)
    mamba2.save_checkpoint(mamba2.init_params(other, jax.random.key(1)), other, tmp_path / "other")
    for extra, message in ((["--speculative", str(tmp_path / "other")], "differs from the model's"),
                           (["--draft-tokens", "3"], "goes with --speculative"),
                           (["--speculative", "lookup", "--draft-tokens", "0"], "--draft-tokens must be in")):
        assert main([*args, *extra]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model", "/no/such/dir", "--prompt-ids", "1"], "no such directory, and not a preset"),
    (["--model", "{ckpt}", "--prompt", "hello"], "needs a tokenizer.json"),
    (["--model", "{ckpt}", "--prompt-ids", "1,x"], "comma-separated integers"),
    (["--model", "{ckpt}", "--prompt-ids", "1,999"], "out of range"),
    (["--model", "{ckpt}", "--prompt-ids", "1", "--top-p", "1.5"], "--top-p must be a number in"),
    (["--model", "{ckpt}"], "give a prompt"),
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


def test_demo_runs(capsys):
    assert main(["demo", "--prompt-len", "20", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "retention" in out and "GLA" in out and "tokens/s" in out


def test_bench_train_on_a_tiny_model(tmp_path, capsys):
    import json

    out = tmp_path / "train.json"
    model = "d_model=32,n_layer=1,vocab_size=50,d_state=8,headdim=16,chunk_size=8"
    assert main(["bench", "--train", "--model", model, "--train-lengths", "16", "--train-batch", "2",
                 "--dtype", "float32", "--repeats", "1", "--json", str(out)]) == 0
    assert "| train | float32 | 2 | 16 | layer |" in capsys.readouterr().out  # ssdkit train's default
    (result,) = json.loads(out.read_text())["results"]
    assert result["tokens_per_s"] > 0 and result["peak_bytes"] > result["state_bytes"] > 0
    assert main(["bench", "--train", "--model", model, "--remat", "all"]) == 2
    assert "--remat 'all' is not one of none, layer, matmuls" in capsys.readouterr().err
    assert main(["bench", "--model", "d_model=big"]) == 2
    assert "is not a number" in capsys.readouterr().err

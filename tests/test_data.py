"""Packing, splitting and sampling of training data (ssdkit.training.data)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ssdkit.training.data import ByteTokenizer, RowSampler, pack_documents, split_documents


@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), seq_len=st.integers(2, 24))
def test_packing_keeps_every_token_in_order_and_numbers_documents(lengths, seq_len):
    docs = [np.arange(n, dtype=np.int32) + 1000 * i for i, n in enumerate(lengths)]
    if sum(lengths) < seq_len:
        with pytest.raises(ValueError, match="fewer than one row"):
            pack_documents(docs, seq_len)
        return
    rows = pack_documents(docs, seq_len)
    flat = np.concatenate(docs)
    n = len(rows) * seq_len
    assert len(rows) == sum(lengths) // seq_len
    np.testing.assert_array_equal(rows.tokens.reshape(-1), flat[:n])  # order kept, tail dropped
    doc_of = rows.tokens // 1000
    # a new segment exactly where the document changes (and at each row start)
    starts = np.concatenate([np.ones((len(rows), 1), bool), doc_of[:, 1:] != doc_of[:, :-1]], axis=1)
    np.testing.assert_array_equal(rows.segment_ids, np.cumsum(starts, axis=1) - 1)
    np.testing.assert_array_equal(rows.token_bytes, 1.0)


def test_packing_rejects_bad_input_and_scales_bytes():
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        pack_documents([np.arange(5)], 1)
    with pytest.raises(ValueError, match="no non-empty documents"):
        pack_documents([np.arange(0)], 4)
    with pytest.raises(ValueError, match="1-D integer array"):
        pack_documents([np.zeros(5)], 4)
    rows = pack_documents([np.arange(3), np.arange(5)], 4, bytes_per_token=[2.0, 0.5])
    np.testing.assert_array_equal(rows.token_bytes, [[2, 2, 2, 0.5], [0.5, 0.5, 0.5, 0.5]])


def test_split_is_by_document_and_deterministic():
    train, held = split_documents(20, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18 and not set(train) & set(held)
    np.testing.assert_array_equal(split_documents(20, 0.1, seed=3)[1], held)
    assert split_documents(1, 0.5, seed=0)[1].size == 0  # one document: nothing to hold out by document
    with pytest.raises(ValueError, match="held_out"):
        split_documents(5, 1.0, seed=0)


def test_sampler_is_a_function_of_the_step_and_covers_each_epoch():
    s = RowSampler(num_rows=10, batch_size=4, seed=7)
    epoch0 = np.concatenate([s.indices(0), s.indices(1), s.indices(2)[:2]])
    assert sorted(epoch0.tolist()) == list(range(10))  # every row once per epoch
    np.testing.assert_array_equal(RowSampler(10, 4, 7).indices(5), s.indices(5))  # a resumed run reads the same
    assert not np.array_equal(RowSampler(10, 4, 8).indices(0), s.indices(0))
    with pytest.raises(ValueError, match="batch_size"):
        RowSampler(num_rows=3, batch_size=4, seed=0)


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer()
    ids = tok.encode("naïve – ok")
    # <|endoftext|> (256) first: the document boundary before the text, so its first byte is predicted
    assert ids.dtype == np.int32 and ids[0] == tok.eod_id == 256 and ids[1:].max() < 256
    assert ids[1:].tobytes() == np.frombuffer("naïve – ok".encode(), np.uint8).astype(np.int32).tobytes()
    assert tok.decode(ids) == "naïve – ok"  # specials decode to nothing

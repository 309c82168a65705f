"""Multi-query associative recall (MQAR), the synthetic task of the Zoology benchmark (Arora et al. 2023,
"Zoology: Measuring and Improving Recall in Efficient Language Models").

Each row binds ``num_pairs`` keys to values, then asks for ``num_queries`` of them back::

    k1 v1 k2 v2 ... kn vn   q1 a1 q2 a2 ... qm am          (seq = 2·num_pairs + 2·num_queries)

Keys are distinct within a row (drawn without replacement from the key vocabulary); values are drawn
independently and uniformly from the value vocabulary (two keys may share a value). The queries are
distinct keys of the row's pairs in random order, each followed by its answer ``a_j`` = the value bound
to ``q_j``. Only the answers are targets: ``loss_mask`` is True exactly at the ``num_queries`` answer
positions, and each is predicted from its query's position (``ssdkit.next_token_targets``: token t is
predicted from position t - 1). With that mask, ``LossMetrics.accuracy`` of a model's loss is the query
accuracy, the fraction of answers that are the argmax prediction; chance is ``1 / value_vocab``.

Token ids (``vocab = mqar_vocab_size(key_vocab, value_vocab) = 1 + key_vocab + value_vocab``)::

    0                                        unused (reserved for padding; never emitted)
    1 .. key_vocab                           keys
    1 + key_vocab .. key_vocab + value_vocab values

The generator runs on the host (NumPy) and is deterministic: the same seed, or a
``numpy.random.Generator`` in the same state, gives the same batch. Pass one ``Generator`` to successive
calls for a stream of fresh batches, and a separately seeded one for a held-out batch.
"""

from __future__ import annotations

from numbers import Integral

import numpy as np


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def mqar_vocab_size(key_vocab: int, value_vocab: int) -> int:
    """Token ids a model needs for the task: pad 0, the keys, the values."""
    return 1 + _positive_int("key_vocab", key_vocab) + _positive_int("value_vocab", value_vocab)


def mqar_seq_len(num_pairs: int, num_queries: int) -> int:
    """Tokens per row: the key-value pairs, then the (query, answer) pairs."""
    return 2 * (_positive_int("num_pairs", num_pairs) + _positive_int("num_queries", num_queries))


def mqar_batch(
    rng: np.random.Generator | int,
    *,
    batch: int,
    num_pairs: int,
    num_queries: int,
    key_vocab: int,
    value_vocab: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One batch of MQAR rows: ``(tokens, loss_mask)``, int32 and bool NumPy arrays of shape (batch, seq).

    Args:
        rng: a ``numpy.random.Generator`` (advanced by the call) or an int seed.
        batch: rows.
        num_pairs: key-value pairs per row (at most ``key_vocab``: keys are distinct).
        num_queries: queried keys per row (at most ``num_pairs``: queries are distinct keys of the row).
        key_vocab: size of the key vocabulary, ids ``1 .. key_vocab``.
        value_vocab: size of the value vocabulary, ids ``key_vocab + 1 .. key_vocab + value_vocab``.

    Returns:
        ``tokens`` (batch, seq) int32 with ``seq = mqar_seq_len(num_pairs, num_queries)``, and
        ``loss_mask`` (batch, seq) bool, True at the answer tokens (odd positions from ``2·num_pairs + 1``).

    Raises:
        ValueError: naming the offending argument (a size that is not a positive integer, more pairs
            than keys, more queries than pairs, an ``rng`` that is neither a Generator nor an int).
    """
    batch = _positive_int("batch", batch)
    num_pairs = _positive_int("num_pairs", num_pairs)
    num_queries = _positive_int("num_queries", num_queries)
    key_vocab = _positive_int("key_vocab", key_vocab)
    value_vocab = _positive_int("value_vocab", value_vocab)
    if num_pairs > key_vocab:
        raise ValueError(f"num_pairs ({num_pairs}) must not exceed key_vocab ({key_vocab}): keys in a row are "
                         f"distinct")
    if num_queries > num_pairs:
        raise ValueError(f"num_queries ({num_queries}) must not exceed num_pairs ({num_pairs}): queries are "
                         f"distinct keys of the row")
    if isinstance(rng, np.random.Generator):
        gen = rng
    elif isinstance(rng, Integral) and not isinstance(rng, bool):
        gen = np.random.default_rng(int(rng))
    else:
        raise ValueError(f"rng must be a numpy.random.Generator or an int seed, got {type(rng).__name__}")

    rows = np.arange(batch)[:, None]
    # Distinct keys per row: the first num_pairs of a random permutation of the key vocabulary.
    keys = 1 + np.argsort(gen.random((batch, key_vocab)), axis=1)[:, :num_pairs]
    values = 1 + key_vocab + gen.integers(0, value_vocab, (batch, num_pairs))
    # Distinct queried pairs per row, in random order.
    which = np.argsort(gen.random((batch, num_pairs)), axis=1)[:, :num_queries]

    n_ctx = 2 * num_pairs
    tokens = np.empty((batch, n_ctx + 2 * num_queries), np.int32)
    tokens[:, 0:n_ctx:2] = keys
    tokens[:, 1:n_ctx:2] = values
    tokens[:, n_ctx::2] = keys[rows, which]
    tokens[:, n_ctx + 1::2] = values[rows, which]
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, n_ctx + 1::2] = True
    return tokens, loss_mask


#: The task the tests and benchmarks/mqar_archs.py train on: 16 tokens a row, chance 1/16.
TASK = dict(num_pairs=4, num_queries=4, key_vocab=16, value_vocab=16)


def train_on_mqar(loss_fn, params, *, steps: int, lr: float = 1e-2, batch: int = 32, held_out_rows: int = 512,
                  seed: int = 0, held_out_seed: int = 12345, task: dict | None = None):
    """Train on a fresh MQAR batch each step and score a held-out batch.

    ``loss_fn(params, (tokens, loss_mask)) -> (loss, ssdkit.LossMetrics)``; AdamW (``ssdkit.adamw``: 20 warm-up
    steps, cosine, no weight decay) through ``ssdkit.make_train_step``. Returns the final ``TrainState``, the
    last step's metrics and the held-out batch's metrics (``accuracy`` is the query accuracy: only the answers
    are targets)."""
    import jax

    from ssdkit.training.step import TrainState, adamw, make_train_step

    task = TASK if task is None else task
    opt = adamw(lr, total_steps=steps, warmup_steps=20, weight_decay=0.0)
    step = make_train_step(loss_fn, opt)
    state = TrainState.create(params, opt)
    rng = np.random.default_rng(seed)
    metrics = None
    for _ in range(steps):
        state, metrics = step(state, mqar_batch(rng, batch=batch, **task))
    held_out = mqar_batch(held_out_seed, batch=held_out_rows, **task)
    _, held_out_metrics = jax.jit(loss_fn)(state.params, held_out)
    return state, metrics, held_out_metrics

"""Synthetic tasks for training tests and ablations.

* :mod:`ssdkit.models.tasks.mqar` — multi-query associative recall (Zoology's MQAR): recall the value bound to
  each queried key, a test of what a recurrence's fixed-size state can store and retrieve.
"""

from ssdkit.models.tasks.mqar import mqar_batch, mqar_seq_len, mqar_vocab_size

__all__ = ["mqar_batch", "mqar_seq_len", "mqar_vocab_size"]

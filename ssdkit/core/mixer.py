"""The mixer protocol: a layer written once against :class:`LayerOps` runs as prefill, decode and verify.

A *mixer* is the sequence-mixing part of a layer (Mamba-2's mixer, GLA, a delta-rule layer, your own).
It computes the recurrence's inputs from the layer's input, and its output from the recurrence's output;
the recurrent parts in between (each short causal conv and the scan) are calls to ``ops``, which the
caller provides for the mode at hand::

    class MyMixer:                      # hashable: a frozen dataclass of settings (no arrays)
        def recurrence(self, cfg) -> ssdkit.Recurrence
        def conv_channels(self, cfg) -> int | tuple[int, ...]
        def init_layer(self, cfg, key) -> params                     # one layer's PyTree of arrays
        def __call__(self, cfg, params, h, ops) -> out               # h, out: (..., d_model)

``cfg`` is the model's shape config (:class:`ssdkit.LMConfig` in :class:`ssdkit.MixerLM`). ``h`` is
(batch, seq, d_model) for a sequence or (batch, d_model) for one decode step; the mixer uses
``h.shape[:-1]`` as the leading shape and never branches on the mode. Inside ``__call__``:

* ``ops.conv(inputs, weight, bias=None)`` — the causal depthwise conv of ``inputs`` (..., C) with
  ``weight`` (K, C) (:func:`ssdkit.causal_conv1d`; no activation), continuing from the cache's window.
  A mixer calls it once per entry of ``conv_channels`` (an int: one conv; a tuple: one per entry, in that
  order; 0 or ``()``: none), with the K of the cache (``LMConfig.conv_kernel``).
* ``ops.scan(x, log_a, b, c, *, w=None, u=None, bonus=None, readout="inclusive")`` — the recurrence
  (:func:`ssdkit.ssd_scan` arguments, sequence or step shapes as ``h``), exactly once; returns ``y``.

The ops for a sequence run :func:`ssdkit.causal_conv1d` and :func:`ssdkit.ssd_scan` (resetting at
``segment_ids`` changes, holding state past ragged ``lengths``), those for a step
:func:`ssdkit.causal_conv1d_step` and :func:`ssdkit.ssd_step`, and those for speculative verification
:func:`ssdkit.ssd_verify` while keeping each conv's inputs, so that :func:`commit_layer` gives the cache
after any prefix of the verified tokens with no second pass over the weights. That is what makes
speculative decoding, packed training and ragged prompts free for every mixer: the recurrent parts are
the caller's.

A mixer may set ``pre_norm = False`` to receive the residual stream un-normed (:class:`ssdkit.MixerLM`
norms each layer's input by default), and may define ``head_axes(cfg) -> PyTree`` matching
``init_layer``'s, each leaf the axis of that array split by head over a mesh's ``model`` axis, or None
(:meth:`ssdkit.MixerLM.param_specs`).

The ops objects collect what the calls produce (windows, state, records) while the mixer runs: each is
made for one layer call by :func:`run_layer` and read once after it returns; nothing outlives the call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from ssdkit._typing import Lengths, SegmentIds
from ssdkit.core.cache import RecurrentCache
from ssdkit.core.conv import causal_conv1d, causal_conv1d_step
from ssdkit.core.recurrence import Recurrence
from ssdkit.core.rollback import ScanRecord, conv_commit, ssd_commit, ssd_verify
from ssdkit.core.scan import ssd_scan
from ssdkit.core.step import ssd_step

#: The modes a layer runs in (:func:`run_layer`).
MODES = ("sequence", "step", "verify")


class LayerOps(Protocol):
    """The recurrent operations a mixer calls (see the module docstring)."""

    def conv(self, inputs: jax.Array, weight: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        """Causal depthwise conv of ``inputs`` (..., C) with ``weight`` (K, C), continuing the cache's window."""
        ...

    def scan(self, x: jax.Array, log_a: jax.Array, b: jax.Array, c: jax.Array, *, w: jax.Array | None = None,
             u: jax.Array | None = None, bonus: jax.Array | None = None, readout: str = "inclusive") -> jax.Array:
        """The recurrence over the inputs (sequence or step shapes); returns ``y`` shaped like ``x``."""
        ...


class Mixer(Protocol):
    """A layer's sequence mixer (module docstring). Implementations are hashable (frozen dataclasses)."""

    def recurrence(self, cfg: Any) -> Recurrence:
        """The structure of the layer's recurrence (heads, head_dim, state_dim, groups, kinds, chunk size)."""
        ...

    def conv_channels(self, cfg: Any) -> int | tuple[int, ...]:
        """Channels of each conv the layer calls, in call order (0 or () for none)."""
        ...

    def init_layer(self, cfg: Any, key: jax.Array) -> Any:
        """One layer's parameters (a PyTree of arrays)."""
        ...

    def __call__(self, cfg: Any, params: Any, h: jax.Array, ops: LayerOps) -> jax.Array:
        """The layer's output (..., d_model) from its input ``h`` (..., d_model)."""
        ...


def check_mixer(mixer: Any) -> None:
    """Raise TypeError naming what ``mixer`` lacks of :class:`Mixer` (methods, hashability)."""
    methods = ("recurrence", "conv_channels", "init_layer", "__call__")
    missing = [m for m in methods if not callable(getattr(mixer, m, None))]
    if missing:
        raise TypeError(f"{type(mixer).__name__} is not a mixer: it lacks {', '.join(missing)} (ssdkit.Mixer: "
                        f"recurrence(cfg), conv_channels(cfg), init_layer(cfg, key), __call__(cfg, params, h, ops))")
    try:
        hash(mixer)
    except TypeError as e:
        raise TypeError(f"{type(mixer).__name__} is not a mixer: it must be hashable (a frozen dataclass), "
                        f"since the model is a static argument of jit") from e


def conv_spec(mixer: Mixer, cfg: Any) -> int | tuple[int, ...]:
    """The mixer's ``conv_channels``, with "no conv" (0) as the empty tuple: the cache then holds no window."""
    channels = mixer.conv_channels(cfg)
    return () if isinstance(channels, int | np.integer) and channels == 0 else channels


def conv_windows(cache: RecurrentCache, channels: int | tuple[int, ...]) -> tuple[jax.Array, ...]:
    """The cache's windows as a tuple, one per conv of ``channels`` (:func:`conv_spec`)."""
    return tuple(cache.conv) if isinstance(channels, tuple) else (cache.conv,)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What :func:`commit_layer` needs of a verified layer: the cache's conv entry before the k tokens,
    each conv's k inputs, and the scan's :class:`~ssdkit.ScanRecord`.

    Attributes:
        conv: the cache's ``conv`` before the k tokens: a window (batch, K-1, C) or a tuple of them (one
            per conv; empty for a layer without a conv).
        inputs: per conv, its k inputs (batch, k, C).
        scan: the scan's record (the state before the k tokens and their inputs).
    """

    conv: Any
    inputs: tuple[jax.Array, ...]
    scan: ScanRecord


class _Ops:
    """Base of the three modes' ops: counts the calls and keeps what they produce."""

    def __init__(self, spec: Recurrence, cache: RecurrentCache, channels, segment_ids=None, lengths=None):
        self.spec, self.cache, self.channels = spec, cache, channels
        self.segment_ids, self.lengths = segment_ids, lengths
        self.windows_in = conv_windows(cache, channels)
        self.windows: list = []
        self.inputs: list = []
        self.result = None  # the state (sequence, step) or the ScanRecord (verify)

    def _next_window(self, inputs, weight):
        i = len(self.windows)
        if i >= len(self.windows_in):
            raise ValueError(f"the mixer called ops.conv {i + 1} times, but its conv_channels "
                             f"{self.channels!r} declares {len(self.windows_in)} conv(s)")
        window = self.windows_in[i]
        if np.shape(inputs)[-1] != np.shape(window)[-1] or np.shape(weight)[0] != np.shape(window)[1] + 1:
            raise ValueError(f"ops.conv call {i}: inputs of {np.shape(inputs)[-1]} channels with a kernel of "
                             f"{np.shape(weight)[0]}, but the cache's window {i} is {np.shape(window)} "
                             f"(batch, K-1, channels): conv_channels and the config's conv_kernel say otherwise")
        return window

    def _scan_once(self, w, u, bonus, readout) -> dict:
        """Raise on a second scan call; the keyword options the primitive takes (only those given, so a
        diagonal layer calls the primitives exactly as before the rank-one kind existed)."""
        if self.result is not None:
            raise ValueError("the mixer called ops.scan twice: a layer has one recurrence (one state)")
        options = {} if bonus is None and readout == "inclusive" else {"bonus": bonus, "readout": readout}
        if w is not None or u is not None:
            options.update(w=w, u=u)
        return options

    def finish(self):
        if len(self.windows) != len(self.windows_in):
            raise ValueError(f"the mixer called ops.conv {len(self.windows)} times, but its conv_channels "
                             f"{self.channels!r} declares {len(self.windows_in)}")
        if self.result is None:
            raise ValueError("the mixer never called ops.scan: a layer runs its recurrence once")


class _SequenceOps(_Ops):
    def conv(self, inputs, weight, bias=None):
        window = self._next_window(inputs, weight)
        y, new = causal_conv1d(inputs, weight, bias, window=window, lengths=self.lengths,
                               segment_ids=self.segment_ids)
        self.windows.append(new)
        return y

    def scan(self, x, log_a, b, c, *, w=None, u=None, bonus=None, readout="inclusive"):
        if self.lengths is not None:  # steps past a row's length are identity steps: the state holds
            valid = jnp.arange(x.shape[1])[None, :] < self.lengths[:, None]
            keep = lambda a: None if a is None else jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 2)), a, 0)
            x, log_a, w = keep(x), keep(log_a), keep(w)
        options = self._scan_once(w, u, bonus, readout)
        y, self.result = ssd_scan(x, log_a, b, c, chunk_size=self.spec.chunk_size, initial_state=self.cache.state,
                                  segment_ids=self.segment_ids, **options)
        return y


class _StepOps(_Ops):
    def conv(self, inputs, weight, bias=None):
        window = self._next_window(inputs, weight)
        y, new = causal_conv1d_step(inputs, weight, bias, window)
        self.windows.append(new)
        return y

    def scan(self, x, log_a, b, c, *, w=None, u=None, bonus=None, readout="inclusive"):
        options = self._scan_once(w, u, bonus, readout)
        y, self.result = ssd_step(self.cache.state, x, log_a, b, c, **options)
        return y


class _VerifyOps(_Ops):
    def conv(self, inputs, weight, bias=None):
        window = self._next_window(inputs, weight)
        y, new = causal_conv1d(inputs, weight, bias, window=window)
        self.windows.append(new)
        self.inputs.append(inputs)
        return y

    def scan(self, x, log_a, b, c, *, w=None, u=None, bonus=None, readout="inclusive"):
        options = self._scan_once(w, u, bonus, readout)
        y, self.result = ssd_verify(self.cache.state, x, log_a, b, c, **options)
        return y


_OPS = {"sequence": _SequenceOps, "step": _StepOps, "verify": _VerifyOps}


def run_layer(
    mixer: Mixer, cfg: Any, params: Any, h: jax.Array, cache: RecurrentCache, *, mode: str,
    segment_ids: SegmentIds | None = None, lengths: Lengths | None = None,
) -> tuple[jax.Array, RecurrentCache | LayerRecord]:
    """One mixer call in ``mode`` (:data:`MODES`) from ``cache``: ``(out, new cache)``, or for ``"verify"``
    ``(out, record)`` (:func:`commit_layer` turns the record into the cache after any prefix).

    ``h`` is (batch, seq, d_model) for ``"sequence"`` and ``"verify"`` (seq = k tokens), (batch, d_model) for
    ``"step"``. ``segment_ids`` (batch, seq) resets the convs and the state at each change of id, and
    ``lengths`` (batch,) holds them past each row's length (both ``"sequence"`` only)."""
    if mode not in _OPS:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    spec, channels = mixer.recurrence(cfg), conv_spec(mixer, cfg)
    ops = _OPS[mode](spec, cache, channels, segment_ids=segment_ids, lengths=lengths)
    out = mixer(cfg, params, h, ops)
    ops.finish()
    if mode == "verify":
        return out, LayerRecord(cache.conv, tuple(ops.inputs), ops.result)
    conv = tuple(ops.windows) if isinstance(channels, tuple) else ops.windows[0]
    return out, RecurrentCache(conv=conv, state=ops.result)


def commit_layer(record: LayerRecord, accepted: jax.Array) -> RecurrentCache:
    """The layer's cache after the first ``accepted[b]`` (0..k) verified tokens of each row: every conv
    window by :func:`ssdkit.conv_commit`, the state by :func:`ssdkit.ssd_commit` (no pass over weights)."""
    if isinstance(record.conv, tuple):
        conv = tuple(conv_commit(w, i, accepted) for w, i in zip(record.conv, record.inputs, strict=True))
    else:
        conv = conv_commit(record.conv, record.inputs[0], accepted)
    return RecurrentCache(conv=conv, state=ssd_commit(record.scan, accepted))

"""The structured recurrence as an object: its structural conditions and input validation.

Every recurrence ssdkit runs is, per head ``h`` with state ``S`` of shape (P, N)::

    S_t = exp(log_a_t) * S_{t-1} + x_t ⊗ b_t        y_t = S_t · c_t

with head ``h`` reading the keys/queries ``b, c`` of group ``h // (H / G)``; or, with a rank-one term
(``RankOne.GROUPS`` / ``RankOne.HEADS``: the delta-rule family)::

    S_t = S_{t-1} (D_t + w_t u_tᵀ) + x_t ⊗ b_t        y_t = S_t · c_t,    D_t = diag(exp(log_a_t))

The decay and the rank-one term form one transition ``A_t = D_t + w_t u_tᵀ`` applied to ``S_{t-1}`` from
the right (the decay does not act on the rank-one term, nor after it). ``w, u`` are (..., G, N) per group
or (..., H, N) per head (both the same), absent for the diagonal kinds. The structural conditions that
make the chunked (SSD) algorithm apply are stated and checked here, in one place:

* shapes are static: H heads, head dim P, state dim N, G groups with ``H % G == 0``;
* the decay is diagonal: one scalar per head (``DecayKind.SCALAR``, log-decay shape (..., H)) or one
  per head and state channel (``DecayKind.DIAGONAL``, log-decay shape (..., H, N));
* the decay is a contraction, ``log_a <= 0`` (checked on concrete arrays; under ``jit`` it is a
  documented precondition); with a rank-one term, the stability of ``D_t + w_t u_tᵀ`` (e.g. the delta
  rule's ``0 <= β <= 2`` with unit keys) is the caller's: it is not checkable cheaply and not checked;
* the chunk size is a positive integer.
"""

from __future__ import annotations

import dataclasses
import enum

import jax.numpy as jnp
import numpy as np

from ssdkit.dtypes import check_floating, check_integer, is_concrete, readable


def _member(kind: type[enum.Enum], value, what: str):
    """``value`` as a member of the enum ``kind`` (a member, or its value); ValueError listing the options."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        options = ", ".join(repr(k.value) for k in kind)
        raise ValueError(f"unknown {what} {value!r}; expected one of {options}") from None


class DecayKind(enum.Enum):
    """How the decay is structured."""

    SCALAR = "scalar"  #: one log-decay per head and step (Mamba-2, retention, gated linear attention)
    DIAGONAL = "diagonal"  #: one log-decay per head, state channel and step (GLA, HGRN2, RWKV-6)

    @classmethod
    def resolve(cls, value: DecayKind | str) -> DecayKind:
        return _member(cls, value, "decay kind")


class RankOne(enum.Enum):
    """Whether the transition has a rank-one term ``w_t u_tᵀ`` beside its diagonal decay, and its layout."""

    NONE = "none"  #: diagonal transitions only (``w = u = None``): Mamba-2, GLA, retention
    GROUPS = "groups"  #: w, u of shape (..., G, N), shared by each group's heads like ``b``
    HEADS = "heads"  #: w, u of shape (..., H, N), one pair per head (e.g. a gate or β per head folded in)

    @classmethod
    def resolve(cls, value: RankOne | str | None) -> RankOne:
        return cls.NONE if value is None else _member(cls, value, "rank-one kind")


def _shape(arr) -> tuple[int, ...]:
    return tuple(np.shape(arr))


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Recurrence:
    """Static description of a structured recurrence (hashable: usable as a static jit argument).

    Attributes:
        num_heads: H, independent recurrences.
        head_dim: P, width of the values ``x`` (rows of each head's state).
        state_dim: N, width of the keys ``b`` and queries ``c`` (columns of each head's state).
        num_groups: G, number of key/query groups; head ``h`` reads group ``h // (H // G)``.
        decay: scalar-per-head or diagonal-per-state-channel decay.
        chunk_size: Q, tokens per chunk of the chunked scan.
        rank_one: the transition's rank-one term ``w_t u_tᵀ``: none (diagonal kinds), per group or per
            head. The transition is ``A_t = diag(exp(log_a_t)) + w_t u_tᵀ``, ``S_t = S_{t-1} A_t + x_t ⊗ b_t``.
    """

    num_heads: int
    head_dim: int
    state_dim: int
    num_groups: int = 1
    decay: DecayKind = DecayKind.SCALAR
    chunk_size: int = 64
    rank_one: RankOne = RankOne.NONE

    def __post_init__(self):
        for name in ("num_heads", "head_dim", "state_dim", "num_groups", "chunk_size"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "decay", DecayKind.resolve(self.decay))
        object.__setattr__(self, "rank_one", RankOne.resolve(self.rank_one))
        if self.num_heads % self.num_groups:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_groups ({self.num_groups}): "
                f"each group of keys/queries is shared by num_heads // num_groups heads"
            )

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    def group_of(self, head: int) -> int:
        """The key/query group that ``head`` reads."""
        return head // self.heads_per_group

    def log_decay_shape(self, *lead: int) -> tuple[int, ...]:
        if self.decay is DecayKind.SCALAR:
            return (*lead, self.num_heads)
        return (*lead, self.num_heads, self.state_dim)

    @property
    def has_rank_one(self) -> bool:
        """True for a diagonal-plus-rank-one transition (the delta-rule family)."""
        return self.rank_one is not RankOne.NONE

    def rank_one_shape(self, *lead: int) -> tuple[int, ...] | None:
        """Shape of ``w`` and ``u`` (None when the transition has no rank-one term)."""
        if self.rank_one is RankOne.NONE:
            return None
        return (*lead, self.num_groups if self.rank_one is RankOne.GROUPS else self.num_heads, self.state_dim)

    def state_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.num_heads, self.head_dim, self.state_dim)

    def init_state(self, batch: int, dtype=jnp.float32):
        """A zero recurrent state, shape (batch, H, P, N), float32 by default."""
        return jnp.zeros(self.state_shape(batch), dtype)

    # ------------------------------------------------------------------ inference from inputs
    @classmethod
    def from_inputs(cls, x, log_a, b, *, chunk_size: int = 64, step: bool = False, w=None, u=None) -> Recurrence:
        """Infer the recurrence from (sequence or step) inputs, checking ranks first.

        Sequence form: x (batch, seq, H, P), log_a (batch, seq, H) or (batch, seq, H, N),
        b (batch, seq, G, N), optional w, u (batch, seq, G, N) or (batch, seq, H, N). Step form drops the
        ``seq`` axis.
        """
        lead = 1 if step else 2
        form = "step" if step else "sequence"
        xs, bs, ls = _shape(x), _shape(b), _shape(log_a)
        axes_x = "(batch, H, P)" if step else "(batch, seq, H, P)"
        axes_b = "(batch, G, N)" if step else "(batch, seq, G, N)"
        if len(xs) != lead + 2:
            raise ValueError(f"x must have shape {axes_x} ({lead + 2} axes) in {form} form, got {xs}")
        if len(bs) != lead + 2:
            raise ValueError(f"b must have shape {axes_b} ({lead + 2} axes) in {form} form, got {bs}")
        if len(ls) == lead + 1:
            decay = DecayKind.SCALAR
        elif len(ls) == lead + 2:
            decay = DecayKind.DIAGONAL
        else:
            raise ValueError(
                f"log_a must have {lead + 1} axes (scalar decay per head) or {lead + 2} axes (diagonal "
                f"decay per state channel) in {form} form, got shape {ls}"
            )
        _positive_int("chunk_size", chunk_size)
        heads, hdim = xs[-2:]
        groups, state = bs[-2:]
        if groups == 0 or heads % groups:
            raise ValueError(
                f"the number of heads H={heads} (x.shape[-2]) must be a multiple of the number of groups "
                f"G={groups} (b.shape[-2])"
            )
        return cls(heads, hdim, state, groups, decay, chunk_size, _rank_one_kind(w, u, heads, groups, lead, form))

    # ------------------------------------------------------------------ validation
    def check_scan_inputs(self, x, log_a, b, c, initial_state=None, segment_ids=None, *, w=None, u=None) -> None:
        """Raise a plain-words error if sequence-form inputs break a structural condition."""
        self._check(x, log_a, b, c, initial_state, lead_names=("batch", "seq"), w=w, u=u)
        if segment_ids is not None:
            check_integer("segment_ids", segment_ids)
            expected = _shape(x)[:2]
            if _shape(segment_ids) != expected:
                raise ValueError(
                    f"segment_ids must have shape (batch, seq) = {expected}, got {_shape(segment_ids)}"
                )

    def check_step_inputs(self, state, x, log_a, b, c, *, w=None, u=None) -> None:
        """Raise a plain-words error if single-step inputs break a structural condition."""
        if state is None:
            raise ValueError("ssd_step needs a state of shape (batch, H, P, N); use init_state(batch)")
        self._check(x, log_a, b, c, state, lead_names=("batch",), w=w, u=u)

    def _check(self, x, log_a, b, c, state, lead_names, w=None, u=None) -> None:
        for name, arr in (("x", x), ("log_a", log_a), ("b", b), ("c", c)):
            check_floating(name, arr)
        lead = _shape(x)[: len(lead_names)]
        lead_str = ", ".join(f"{n}={v}" for n, v in zip(lead_names, lead, strict=True))
        expected = {
            "x": (*lead, self.num_heads, self.head_dim),
            "log_a": self.log_decay_shape(*lead),
            "b": (*lead, self.num_groups, self.state_dim),
            "c": (*lead, self.num_groups, self.state_dim),
        }
        for name, arr in (("x", x), ("log_a", log_a), ("b", b), ("c", c)):
            if _shape(arr) != expected[name]:
                raise ValueError(
                    f"{name} has shape {_shape(arr)} but the recurrence ({lead_str}, H={self.num_heads}, "
                    f"P={self.head_dim}, N={self.state_dim}, G={self.num_groups}, "
                    f"{self.decay.value} decay) expects {expected[name]}"
                )
        want_wu = self.rank_one_shape(*lead)
        if want_wu is None:
            if w is not None or u is not None:
                raise ValueError("w and u were given but the recurrence has no rank-one term (rank_one='none'); "
                                 "build it with rank_one='groups' or 'heads'")
        else:
            if w is None or u is None:
                raise ValueError(f"the recurrence has a rank-one term ({self.rank_one.value}): pass both w and u "
                                 f"of shape {want_wu}")
            for name, arr in (("w", w), ("u", u)):
                check_floating(name, arr)
                if _shape(arr) != want_wu:
                    raise ValueError(
                        f"{name} has shape {_shape(arr)} but the recurrence ({lead_str}, H={self.num_heads}, "
                        f"N={self.state_dim}, G={self.num_groups}, rank-one term per "
                        f"{'group' if self.rank_one is RankOne.GROUPS else 'head'}) expects {want_wu}"
                    )
        if state is not None:
            check_floating("state", state)
            want = self.state_shape(lead[0])
            if _shape(state) != want:
                raise ValueError(
                    f"the recurrent state must have shape (batch, H, P, N) = {want}, got {_shape(state)}"
                )
            if jnp.dtype(state.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
                raise TypeError(
                    f"the recurrent state must be float32 (or float64), got {state.dtype}: a half-"
                    f"precision state loses the recurrence within a few dozen steps"
                )
        if is_concrete(log_a):
            worst = float(np.max(readable(log_a).astype(np.float64), initial=-np.inf))
            if not worst <= 0.0:  # also catches NaN
                raise ValueError(
                    f"log_a must be <= 0 everywhere (the decay exp(log_a) must be a contraction); "
                    f"found a maximum of {worst}"
                )


READOUTS = ("inclusive", "exclusive")


def check_readout(spec: Recurrence, readout, bonus, lead: tuple[int, ...]) -> bool:
    """Check ``readout`` and ``bonus`` against ``spec``; return True for the exclusive readout.

    ``readout`` is ``"inclusive"`` (``y_t = S_t c_t``, the default) or ``"exclusive"`` (``y_t = S_{t-1} c_t``,
    RWKV-6's). ``bonus`` is None or a float array of shape (H, N) (one per head and key channel, constant
    over time, RWKV-6's ``u``) or ``(*lead, H, N)`` (per step): ``y_t += ((bonus ⊙ c_t)·b_t) x_t``.
    """
    if not isinstance(readout, str) or readout not in READOUTS:
        raise ValueError(f"readout must be 'inclusive' (y_t = S_t c_t) or 'exclusive' (y_t = S_(t-1) c_t), "
                         f"got {readout!r}")
    if bonus is not None:
        check_floating("bonus", bonus)
        per_head = (spec.num_heads, spec.state_dim)
        if _shape(bonus) not in (per_head, (*lead, *per_head)):
            raise ValueError(f"bonus must have shape (H, N) = {per_head} (constant over time) or "
                             f"{(*lead, *per_head)} (per step), got {_shape(bonus)}")
    return readout == "exclusive"


def _rank_one_kind(w, u, heads: int, groups: int, lead: int, form: str) -> RankOne:
    """The rank-one layout that ``w`` and ``u`` have: none, per group or per head (both the same)."""
    if w is None and u is None:
        return RankOne.NONE
    if w is None or u is None:
        given, missing = ("w", "u") if u is None else ("u", "w")
        raise ValueError(f"{given} was given without {missing}: the rank-one term w_t u_tᵀ needs both")
    ws, us = _shape(w), _shape(u)
    axes = "(batch, G or H, N)" if lead == 1 else "(batch, seq, G or H, N)"
    for name, s in (("w", ws), ("u", us)):
        if len(s) != lead + 2:
            raise ValueError(f"{name} must have shape {axes} ({lead + 2} axes) in {form} form, got {s}")
    if ws != us:
        raise ValueError(f"w and u must have the same shape (both per group or both per head), got {ws} and {us}")
    if ws[-2] == groups:
        return RankOne.GROUPS
    if ws[-2] == heads:
        return RankOne.HEADS
    raise ValueError(f"w and u must have G={groups} (per group, like b) or H={heads} (per head) entries on their "
                     f"second-to-last axis, got shape {ws}")

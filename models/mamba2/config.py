"""Mamba-2 configuration: mamba_ssm field names and published defaults, presets, both JSON formats.

Two ``config.json`` formats are read (:meth:`Mamba2Config.from_json`) and written:

* mamba_ssm's (``d_model``, ``n_layer``, ``vocab_size`` at the top level, SSM settings in ``ssm_cfg``;
  every setting missing from ``ssm_cfg`` takes mamba_ssm's default, which are this class's defaults);
* transformers' (``model_type: "mamba2"``, ``hidden_size``, ``num_heads``, ...; a missing key takes
  transformers' default, e.g. ``n_groups=8`` and ``tie_word_embeddings=False``, as transformers would).
  Its ``vocab_size`` is the already padded one and is kept as is.
"""

from __future__ import annotations

import dataclasses
import json
import math
from numbers import Integral, Real
from pathlib import Path

from ssdkit.tensor_files import parse_json_file

_PRESETS = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48),
    "780m": dict(d_model=1536, n_layer=48),
    "1.3b": dict(d_model=2048, n_layer=48),
    "2.7b": dict(d_model=2560, n_layer=64),
}
#: EleutherAI gpt-neox-20b tokenizer, used by every published Mamba-2 checkpoint.
_NEOX_VOCAB = 50277

_INT_FIELDS = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand",
               "headdim", "ngroups", "chunk_size")
_FLOAT_FIELDS = ("dt_min", "dt_max", "dt_init_floor", "norm_eps")
_PAIR_FIELDS = ("dt_limit", "A_init_range")
#: boolean fields and the only value this implementation supports (None: any)
_BOOL_FIELDS = {"tie_embeddings": None, "conv_bias": True, "bias": False, "rmsnorm": True,
                "norm_before_gate": False, "residual_in_fp32": True}

#: transformers key -> our field, for the optional transformers keys
_TRANSFORMERS_KEYS = {
    "state_size": "d_state", "n_groups": "ngroups", "expand": "expand", "conv_kernel": "d_conv",
    "chunk_size": "chunk_size", "layer_norm_epsilon": "norm_eps", "time_step_limit": "dt_limit",
    "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
    "tie_word_embeddings": "tie_embeddings", "residual_in_fp32": "residual_in_fp32", "use_bias": "bias",
    "use_conv_bias": "conv_bias", "rms_norm": "rmsnorm", "norm_before_gate": "norm_before_gate",
}
#: transformers.Mamba2Config's defaults (5.x) for keys a transformers config.json may leave out
_TRANSFORMERS_DEFAULTS = {"num_heads": 128, "head_dim": 64, "state_size": 128, "n_groups": 8, "expand": 2,
                          "conv_kernel": 4, "chunk_size": 256, "tie_word_embeddings": False}

#: mamba_ssm ``ssm_cfg`` keys that do not change the model this class describes
_SSM_CFG_IGNORED = {"layer", "conv_init", "use_mem_eff_path", "process_group", "sequence_parallel",
                    "layer_idx", "device", "dtype"}


def _json_float(v) -> float:
    """A float from JSON, including transformers' tagged non-finite values ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    if isinstance(v, bool) or not isinstance(v, Real | str):
        raise ValueError(f"expected a number, got {v!r}")
    try:
        return float(v)
    except OverflowError:  # an int beyond float range (JSON allows any number of digits)
        raise ValueError(f"number {v!r} is out of float range") from None


def _tag_nonfinite(obj):
    """transformers' JSON encoding: non-finite floats as ``{"__float__": "Infinity"}``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: _tag_nonfinite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_tag_nonfinite(v) for v in obj]
    return obj


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """A Mamba-2 language model (frozen and hashable: used as a static jit argument).

    ``d_model``, ``n_layer`` and ``vocab_size`` are required keywords; everything else defaults to
    mamba_ssm's published values. Derived sizes: ``d_inner = expand·d_model``,
    ``nheads = d_inner / headdim``, ``conv_dim = d_inner + 2·ngroups·d_state``,
    ``d_in_proj = 2·d_inner + 2·ngroups·d_state + nheads``, ``padded_vocab_size`` = ``vocab_size``
    rounded up to a multiple of ``pad_vocab_size_multiple``.

    Not supported (rejected with a ``ValueError``): an MLP between mixers (``d_intermediate != 0``),
    biases on in/out_proj (``bias=True``), no conv bias, LayerNorm (``rmsnorm=False``), normalising
    before the gate, and a low-precision residual (the residual stream is always float32).
    """

    d_model: int
    n_layer: int
    vocab_size: int
    d_intermediate: int = 0
    pad_vocab_size_multiple: int = 16
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    A_init_range: tuple[float, float] = (1.0, 16.0)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    conv_bias: bool = True
    bias: bool = False
    rmsnorm: bool = True
    norm_before_gate: bool = False
    residual_in_fp32: bool = True

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        for name in _INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive integer, got {v!r}")
            put(name, int(v))
        v = self.d_intermediate
        if isinstance(v, bool) or not isinstance(v, Integral):
            raise ValueError(f"Mamba2Config.d_intermediate must be an integer, got {v!r}")
        if v != 0:
            raise ValueError(
                f"Mamba2Config.d_intermediate={v}: MLP blocks between mixers are not supported by this "
                f"implementation (the published Mamba-2 checkpoints have d_intermediate=0)"
            )
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            try:
                f = math.nan if isinstance(v, bool) or not isinstance(v, Real) else float(v)
            except OverflowError:  # an int beyond float range (JSON numbers have any number of digits)
                f = math.inf
            if not math.isfinite(f):
                raise ValueError(f"Mamba2Config.{name} must be a finite number, got {v!r}")
            put(name, f)
        for name in _PAIR_FIELDS:  # lists (from JSON) become tuples so the config stays hashable
            v = getattr(self, name)
            if isinstance(v, str) or not isinstance(v, list | tuple) or len(v) != 2:
                raise ValueError(f"Mamba2Config.{name} must be a (low, high) pair, got {v!r}")
            try:
                put(name, tuple(_json_float(x) for x in v))
            except ValueError:
                raise ValueError(f"Mamba2Config.{name} must be a pair of numbers, got {v!r}") from None
        for name, supported in _BOOL_FIELDS.items():
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"Mamba2Config.{name} must be True or False, got {v!r}")
            if supported is not None and v is not supported:
                raise ValueError(
                    f"Mamba2Config.{name}={v} is not supported by this implementation "
                    f"(the published checkpoints use {name}={supported})"
                )

        if self.d_inner % self.headdim:
            raise ValueError(
                f"heads·headdim must equal d_inner = expand·d_model = {self.expand}·{self.d_model} = "
                f"{self.d_inner}, but headdim={self.headdim} does not divide it"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"the number of heads (d_inner/headdim = {self.nheads}) must be a multiple of "
                f"ngroups={self.ngroups}"
            )
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"Mamba2Config.dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        a_lo, a_hi = self.A_init_range
        if not (0.0 < a_lo <= a_hi and math.isfinite(a_hi)):
            raise ValueError(f"Mamba2Config.A_init_range must satisfy 0 < low <= high < inf, got {self.A_init_range}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"Mamba2Config needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                             f"dt_max={self.dt_max}")
        if self.dt_init_floor < 0.0:
            raise ValueError(f"Mamba2Config.dt_init_floor must be >= 0, got {self.dt_init_floor}")
        if self.norm_eps <= 0.0:
            raise ValueError(f"Mamba2Config.norm_eps must be positive, got {self.norm_eps}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m

    def num_params(self) -> int:
        """Exact number of parameters in the PyTree for this config (the embedding counted once when tied)."""
        per_layer = (
            self.d_model  # pre-mixer norm
            + self.d_in_proj * self.d_model  # in_proj
            + self.conv_dim * self.d_conv + self.conv_dim  # conv weight and bias
            + 3 * self.nheads  # dt_bias, A_log, D
            + self.d_inner  # gated norm
            + self.d_model * self.d_inner  # out_proj
        )
        vocab = self.padded_vocab_size * self.d_model
        return vocab + self.n_layer * per_layer + self.d_model + (0 if self.tie_embeddings else vocab)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str) -> Mamba2Config:
        """A published size: "130m", "370m", "780m", "1.3b", "2.7b" (also "mamba2-130m",
        "state-spaces/mamba2-130m", ...)."""
        key = str(name).strip().lower().removeprefix("state-spaces/").removeprefix("mamba2-")
        if key not in _PRESETS:
            raise ValueError(f"unknown Mamba-2 preset {name!r}; expected one of {', '.join(_PRESETS)}")
        return cls(vocab_size=_NEOX_VOCAB, **_PRESETS[key])

    @classmethod
    def from_json(cls, path: str | Path) -> Mamba2Config:
        """Read a mamba_ssm ``config.json`` or a transformers one (``model_type: "mamba2"``).

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` (naming the file) for
        anything that is not a supported Mamba-2 config.
        """
        path = Path(path)
        try:
            data = parse_json_file(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> Mamba2Config:
        """Like :meth:`from_json`, from an already parsed dict (either format)."""
        try:
            if "d_model" in data:
                return cls._from_mamba_ssm(data)
            model_type = data.get("model_type")
            if model_type is not None and model_type != "mamba2":
                raise ValueError(f"model_type is {model_type!r}; only 'mamba2' models are supported")
            if model_type == "mamba2" or "hidden_size" in data:
                return cls._from_transformers(data)
            raise ValueError("neither a mamba_ssm config (no d_model) nor a transformers Mamba-2 config "
                             "(no model_type 'mamba2' / hidden_size)")
        except (ValueError, TypeError) as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def _from_mamba_ssm(cls, data: dict) -> Mamba2Config:
        missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"mamba_ssm config lacks {', '.join(missing)}")
        ssm = data.get("ssm_cfg") or {}
        if not isinstance(ssm, dict):
            raise ValueError(f"ssm_cfg must be an object, got {ssm!r}")
        if "layer" not in ssm:  # mamba_ssm's MixerModel builds Mamba1 blocks when ssm_cfg names no layer
            raise ValueError("ssm_cfg names no layer, which mamba_ssm reads as a Mamba-1 model; only "
                             "Mamba-2 models (ssm_cfg.layer = 'Mamba2') are supported")
        if ssm["layer"] != "Mamba2":
            raise ValueError(f"ssm_cfg.layer is {ssm['layer']!r}; only 'Mamba2' models are supported")
        if data.get("attn_layer_idx"):
            raise ValueError(
                f"attn_layer_idx={data['attn_layer_idx']}: hybrid models with attention layers are not supported"
            )
        if ssm.get("D_has_hdim"):
            raise ValueError("ssm_cfg.D_has_hdim=true (D per channel) is not supported")
        known = {f.name for f in dataclasses.fields(cls)} - {"d_model", "n_layer", "vocab_size"}
        unknown = sorted(set(ssm) - known - _SSM_CFG_IGNORED - {"D_has_hdim", "d_ssm"})
        if unknown:
            raise ValueError(f"unknown ssm_cfg fields {unknown}")
        fields = {k: v for k, v in ssm.items() if k in known}
        for k in ("d_model", "n_layer", "vocab_size", "d_intermediate", "pad_vocab_size_multiple",
                  "tie_embeddings", "residual_in_fp32"):
            if k in data:
                fields[k] = data[k]
        if "rms_norm" in data:
            fields["rmsnorm"] = data["rms_norm"]
        cfg = cls(**_coerce(fields))
        d_ssm = ssm.get("d_ssm")  # compared only now that d_model and expand are checked integers
        if d_ssm is not None and d_ssm != cfg.d_inner:
            raise ValueError(f"ssm_cfg.d_ssm={d_ssm} != expand·d_model (a gated MLP inside the mixer) is not "
                             f"supported")
        return cfg

    @classmethod
    def _from_transformers(cls, data: dict) -> Mamba2Config:
        data = {k: v for k, v in data.items() if v is not None}  # null: unset, as transformers reads it
        missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"transformers Mamba-2 config lacks {', '.join(missing)}")
        data = {**_TRANSFORMERS_DEFAULTS, **data}
        fields = dict(d_model=data["hidden_size"], n_layer=data["num_hidden_layers"],
                      vocab_size=data["vocab_size"], headdim=data["head_dim"])
        for src, dst in _TRANSFORMERS_KEYS.items():
            if src in data:
                fields[dst] = data[src]
        fields = _coerce(fields)
        # transformers stores the already padded vocabulary: keep it as is.
        vocab = fields["vocab_size"]
        fields["pad_vocab_size_multiple"] = 16 if type(vocab) is int and vocab % 16 == 0 else 1
        cfg = cls(**fields)  # checks the fields' types before any arithmetic on them
        heads = _coerce({"num_heads": data["num_heads"]})["num_heads"]
        if type(heads) is not int or heads * cfg.headdim != cfg.d_inner:
            product = f" = {heads * cfg.headdim}" if type(heads) is int else ""
            raise ValueError(
                f"num_heads·head_dim = {heads!r}·{cfg.headdim}{product} must equal "
                f"expand·hidden_size = {cfg.expand}·{cfg.d_model} = {cfg.d_inner}"
            )
        return cfg

    # ------------------------------------------------------------------ serialisation
    def to_mamba_ssm_dict(self) -> dict:
        """mamba_ssm's ``config.json`` layout (``MambaConfig`` fields, SSM settings in ``ssm_cfg``)."""
        ssm = dict(layer="Mamba2", d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                   headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.chunk_size,
                   dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor,
                   A_init_range=list(self.A_init_range), norm_before_gate=self.norm_before_gate,
                   rmsnorm=self.rmsnorm, bias=self.bias, conv_bias=self.conv_bias)
        if self.dt_limit != (0.0, math.inf):  # the default needs Infinity, which strict JSON lacks
            ssm["dt_limit"] = list(self.dt_limit)
        if self.norm_eps != 1e-5:  # mamba_ssm hard-codes 1e-5: only a non-default value is written
            ssm["norm_eps"] = self.norm_eps
        return dict(d_model=self.d_model, d_intermediate=self.d_intermediate, n_layer=self.n_layer,
                    vocab_size=self.vocab_size, ssm_cfg=ssm, attn_layer_idx=[], attn_cfg={},
                    rms_norm=self.rmsnorm, residual_in_fp32=self.residual_in_fp32, fused_add_norm=True,
                    pad_vocab_size_multiple=self.pad_vocab_size_multiple, tie_embeddings=self.tie_embeddings)

    def to_transformers_dict(self) -> dict:
        """transformers' ``Mamba2Config`` keys (``model_type: "mamba2"``), vocabulary already padded.

        ``transformers.Mamba2Config(**d)`` builds the equivalent model. ``time_step_limit`` may hold
        ``inf``: write it with :meth:`to_transformers_json` (or transformers' own ``to_json_file``).
        """
        return dict(
            model_type="mamba2", architectures=["Mamba2ForCausalLM"], hidden_size=self.d_model,
            num_hidden_layers=self.n_layer, vocab_size=self.padded_vocab_size, num_heads=self.nheads,
            head_dim=self.headdim, state_size=self.d_state, n_groups=self.ngroups, expand=self.expand,
            conv_kernel=self.d_conv, chunk_size=self.chunk_size, layer_norm_epsilon=self.norm_eps,
            time_step_limit=list(self.dt_limit), time_step_min=self.dt_min, time_step_max=self.dt_max,
            time_step_floor=self.dt_init_floor, tie_word_embeddings=self.tie_embeddings,
            residual_in_fp32=self.residual_in_fp32, use_bias=self.bias, use_conv_bias=self.conv_bias,
            rms_norm=self.rmsnorm, norm_before_gate=self.norm_before_gate,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )

    def to_transformers_json(self) -> str:
        """``config.json`` text in transformers' format (non-finite floats tagged as transformers does)."""
        return json.dumps(_tag_nonfinite(self.to_transformers_dict()), indent=2)


def _coerce(fields: dict) -> dict:
    """JSON values to the field types: integral floats (``2.0``) to int, 0/1 to bool where a bool is expected."""
    out = {}
    for k, v in fields.items():
        if k in _BOOL_FIELDS and not isinstance(v, bool) and isinstance(v, Integral) and v in (0, 1):
            v = bool(v)
        elif isinstance(v, float) and v.is_integer() and k not in _FLOAT_FIELDS and k not in _PAIR_FIELDS:
            v = int(v)
        out[k] = v
    return out

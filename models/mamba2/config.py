"""Mamba-2 configuration: mamba_ssm field names and published defaults, presets, both JSON formats."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

_PRESETS = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48),
    "780m": dict(d_model=1536, n_layer=48),
    "1.3b": dict(d_model=2048, n_layer=48),
    "2.7b": dict(d_model=2560, n_layer=64),
}
_NEOX_VOCAB = 50277


def _json_float(v) -> float:
    """A float from JSON, including transformers' tagged non-finite values ``{"__float__": "Infinity"}``."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    return float(v)


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
    """A Mamba-2 language model (hashable: used as a static jit argument).

    Derived sizes: ``d_inner = expand·d_model``, ``nheads = d_inner / headdim``,
    ``conv_dim = d_inner + 2·ngroups·d_state``, ``d_in_proj = 2·d_inner + 2·ngroups·d_state + nheads``,
    ``padded_vocab_size`` = vocab rounded up to ``pad_vocab_size_multiple``.
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
        for name in ("dt_limit", "A_init_range"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                if not isinstance(value, list | tuple) or len(value) != 2:
                    raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
                object.__setattr__(self, name, tuple(_json_float(v) for v in value))
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv",
                     "expand", "headdim", "ngroups", "chunk_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Mamba2Config.{name} must be a positive integer, got {v!r}")
        if self.d_intermediate != 0:
            raise ValueError(
                f"Mamba2Config.d_intermediate={self.d_intermediate}: MLP blocks between mixers are not "
                f"supported (the published Mamba-2 checkpoints have d_intermediate=0)"
            )
        for name, supported in (("bias", False), ("conv_bias", True), ("rmsnorm", True),
                                ("norm_before_gate", False), ("residual_in_fp32", True)):
            if getattr(self, name) is not supported:
                raise ValueError(
                    f"Mamba2Config.{name}={getattr(self, name)} is not supported by this implementation "
                    f"(the published checkpoints use {name}={supported})"
                )
        if self.d_inner % self.headdim:
            raise ValueError(
                f"heads·headdim must equal d_inner = expand·d_model = {self.d_inner}, but headdim="
                f"{self.headdim} does not divide it"
            )
        if self.nheads % self.ngroups:
            raise ValueError(f"the number of heads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")
        lo, hi = self.dt_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"dt_limit must be (low, high) with 0 <= low < high, got {self.dt_limit}")
        a_lo, a_hi = self.A_init_range
        if not 0.0 < a_lo <= a_hi:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {self.A_init_range}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")

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
        """Exact parameter count (the embedding counted once when tied)."""
        per_layer = (
            self.d_model  # norm
            + self.d_in_proj * self.d_model
            + self.conv_dim * self.d_conv + self.conv_dim
            + 3 * self.nheads  # dt_bias, A_log, D
            + self.d_inner  # gated norm
            + self.d_model * self.d_inner
        )
        head = 0 if self.tie_embeddings else self.padded_vocab_size * self.d_model
        return self.padded_vocab_size * self.d_model + self.n_layer * per_layer + self.d_model + head

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str) -> Mamba2Config:
        """One of the published sizes: "130m", "370m", "780m", "1.3b", "2.7b"."""
        key = name.lower().removeprefix("state-spaces/").removeprefix("mamba2-")
        if key not in _PRESETS:
            raise ValueError(f"unknown Mamba-2 preset {name!r}; expected one of {', '.join(_PRESETS)}")
        return cls(vocab_size=_NEOX_VOCAB, **_PRESETS[key])

    @classmethod
    def from_json(cls, path: str | Path) -> Mamba2Config:
        """Read a mamba_ssm ``config.json`` or a transformers one (``model_type: "mamba2"``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config file at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        if data.get("model_type") == "mamba2" or "hidden_size" in data:
            return cls._from_transformers(data, path)
        return cls._from_mamba_ssm(data, path)

    @classmethod
    def _from_mamba_ssm(cls, data: dict, path: Path) -> Mamba2Config:
        missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a Mamba-2 config (missing {', '.join(missing)})")
        ssm = dict(data.get("ssm_cfg") or {})
        layer = ssm.pop("layer", "Mamba2")
        if layer != "Mamba2":
            raise ValueError(f"{path}: ssm_cfg.layer is {layer!r}; only 'Mamba2' models are supported")
        if data.get("attn_layer_idx"):
            raise ValueError(f"{path}: hybrid models with attention layers (attn_layer_idx) are not supported")
        if data.get("rms_norm") is False:
            raise ValueError(f"{path}: rms_norm=false (LayerNorm backbone) is not supported")
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = {"use_mem_eff_path", "D_has_hdim", "d_ssm", "process_group", "sequence_parallel",
                   "layer_idx", "activation", "learnable_init_states", "dt_init"}
        if ssm.get("D_has_hdim"):
            raise ValueError(f"{path}: D_has_hdim=true is not supported")
        if ssm.get("d_ssm") not in (None, data["d_model"] * ssm.get("expand", 2)):
            raise ValueError(f"{path}: d_ssm != d_inner (a gated MLP inside the mixer) is not supported")
        unknown = sorted(set(ssm) - known - ignored)
        if unknown:
            raise ValueError(f"{path}: unknown ssm_cfg fields {unknown}")
        fields = {k: v for k, v in ssm.items() if k in known}
        if "bias" in fields:
            fields["bias"] = bool(fields["bias"])
        top = {k: data[k] for k in ("d_model", "n_layer", "vocab_size", "d_intermediate",
                                     "pad_vocab_size_multiple", "tie_embeddings", "residual_in_fp32")
               if k in data}
        return cls(**top, **fields)

    @classmethod
    def _from_transformers(cls, data: dict, path: Path) -> Mamba2Config:
        try:
            d_model, expand = int(data["hidden_size"]), int(data.get("expand", 2))
            heads, headdim = int(data["num_heads"]), int(data["head_dim"])
            fields = dict(
                d_model=d_model, n_layer=int(data["num_hidden_layers"]), vocab_size=int(data["vocab_size"]),
                d_state=int(data.get("state_size", 128)), ngroups=int(data.get("n_groups", 1)),
                expand=expand, headdim=headdim, d_conv=int(data.get("conv_kernel", 4)),
                chunk_size=int(data.get("chunk_size", 256)),
            )
        except KeyError as err:
            raise ValueError(f"{path}: transformers Mamba-2 config lacks {err.args[0]!r}") from None
        if heads * headdim != expand * d_model:
            raise ValueError(
                f"{path}: num_heads·head_dim = {heads}·{headdim} = {heads * headdim} must equal "
                f"expand·hidden_size = {expand * d_model}"
            )
        # transformers stores the already padded vocabulary: keep it as is.
        fields["pad_vocab_size_multiple"] = 16 if fields["vocab_size"] % 16 == 0 else 1
        optional = {"layer_norm_epsilon": "norm_eps", "time_step_limit": "dt_limit", "time_step_min": "dt_min",
                    "time_step_max": "dt_max", "time_step_floor": "dt_init_floor",
                    "tie_word_embeddings": "tie_embeddings", "residual_in_fp32": "residual_in_fp32",
                    "use_bias": "bias", "use_conv_bias": "conv_bias", "rms_norm": "rmsnorm",
                    "norm_before_gate": "norm_before_gate"}
        for src, dst in optional.items():
            if data.get(src) is not None:
                fields[dst] = data[src]
        if fields.get("dt_limit") is not None:
            fields["dt_limit"] = tuple(_json_float(v) for v in fields["dt_limit"])
        return cls(**fields)

    # ------------------------------------------------------------------ serialisation
    def to_mamba_ssm_dict(self) -> dict:
        """mamba_ssm's ``config.json`` layout."""
        ssm = dict(layer="Mamba2", d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                   headdim=self.headdim, ngroups=self.ngroups, chunk_size=self.chunk_size,
                   dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=self.dt_init_floor,
                   A_init_range=list(self.A_init_range), norm_before_gate=self.norm_before_gate)
        if self.dt_limit != (0.0, math.inf):
            ssm["dt_limit"] = list(self.dt_limit)  # mamba_ssm reads Python's json (Infinity allowed)
        return dict(d_model=self.d_model, d_intermediate=0, n_layer=self.n_layer, vocab_size=self.vocab_size,
                    ssm_cfg=ssm, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
                    residual_in_fp32=self.residual_in_fp32, fused_add_norm=True,
                    pad_vocab_size_multiple=self.pad_vocab_size_multiple, tie_embeddings=self.tie_embeddings)

    def to_transformers_dict(self) -> dict:
        """transformers' ``Mamba2Config`` keys (``model_type: "mamba2"``), vocabulary already padded."""
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

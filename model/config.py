"""JetMoe model configuration read from a checkpoint's ``config.json``.

Accepts transformers' ``JetMoeConfig`` key names and the older names that hub checkpoints carry
(``n_layer``, ``n_embd``, ``n_head``, ``ffn_hidden_size``, ``moe_num_experts``, ``moe_top_k``). Every
shape-defining field is required: a checkpoint that lacks one is rejected instead of silently taking a default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config.json is missing, unreadable or inconsistent."""


# Our field name -> accepted config.json keys, in order of preference.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("vocab_size",),
    "hidden_size": ("hidden_size", "n_embd"),
    "num_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_kv_heads": ("num_key_value_heads", "n_head"),
    "head_dim": ("kv_channels", "head_dim"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "num_experts": ("num_local_experts", "moe_num_experts"),
    "top_k": ("num_experts_per_tok", "moe_top_k"),
}


@dataclass(frozen=True)
class JetMoeModelConfig:
    """Shapes and constants of a JetMoe network."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    activation: str = "silu"

    def __post_init__(self) -> None:
        for name in _REQUIRED_KEYS:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) exceeds the number of experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.activation != "silu":
            raise ConfigError(f"unsupported activation_function {self.activation!r} (only 'silu')")

    @property
    def num_query_heads(self) -> int:
        """Query heads seen by attention: every chosen attention expert brings a full set of KV heads."""
        return self.top_k * self.num_kv_heads

    @property
    def kv_size(self) -> int:
        """Width of the K (or V) projection: KV heads x head dim."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> JetMoeModelConfig:
        """Build from a config.json mapping, accepting current and legacy key names."""
        values: dict[str, Any] = {name: _pick(raw, keys) for name, keys in _REQUIRED_KEYS.items()}
        missing = [
            f"{name} (one of {', '.join(keys)})"
            for name, keys in _REQUIRED_KEYS.items()
            if values[name] is None
        ]
        if missing:
            raise ConfigError("config.json is missing required fields: " + "; ".join(missing))
        optional = {
            "rms_norm_eps": _pick(raw, ("rms_norm_eps", "layer_norm_epsilon")),
            "rope_theta": _rope_theta(raw),
            "max_position_embeddings": _pick(raw, ("max_position_embeddings", "n_positions")),
            "bos_token_id": _pick(raw, ("bos_token_id",)),
            "eos_token_id": _first_id(_pick(raw, ("eos_token_id",))),
            "tie_word_embeddings": _pick(raw, ("tie_word_embeddings",)),
            "activation": _pick(raw, ("activation_function", "hidden_act")),
        }
        values.update({k: v for k, v in optional.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_dir(cls, path: str | Path) -> JetMoeModelConfig:
        """Read ``config.json`` from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"no config.json in {path}")
        try:
            raw = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {file}: {exc}") from exc
        model_type = raw.get("model_type")
        if model_type not in (None, "jetmoe"):
            raise ConfigError(f"{file} describes a {model_type!r} model, not 'jetmoe'")
        return cls.from_dict(raw)


def _pick(raw: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return None


def _rope_theta(raw: Mapping[str, Any]) -> float | None:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"unsupported rope type {rope_type!r} (only the default rotary embedding)")
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    return None if theta is None else float(theta)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value

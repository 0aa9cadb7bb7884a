"""Small random JetMoe checkpoints built with transformers, saved the way a hub checkpoint is."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import JetMoeConfig
from transformers import JetMoeForCausalLM as HFJetMoe


@dataclass(frozen=True)
class TinyShape:
    """Shape of a random test checkpoint."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_key_value_heads: int = 4
    kv_channels: int = 16
    intermediate_size: int = 96
    num_local_experts: int = 8
    num_experts_per_tok: int = 2


TOP2_OF_8 = TinyShape()
TOP1_OF_4 = TinyShape(
    vocab_size=200,
    hidden_size=96,
    num_hidden_layers=3,
    num_key_value_heads=2,
    kv_channels=32,
    intermediate_size=64,
    num_local_experts=4,
    num_experts_per_tok=1,
)


def build_hf_model(shape: TinyShape, seed: int = 0) -> HFJetMoe:
    """A random transformers JetMoe with a wide init (peaked logits, few greedy near-ties) and nonzero biases."""
    torch.manual_seed(seed)
    config = JetMoeConfig(**asdict(shape), initializer_range=0.08, rms_norm_eps=1e-5)
    model = HFJetMoe(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.05)
            elif "layernorm" in name or name.endswith("norm.weight"):
                param.uniform_(0.7, 1.3)
    return model


def save_checkpoint(shape: TinyShape, directory: Path, seed: int = 0, **save_kwargs: object) -> HFJetMoe:
    """Build a random model, ``save_pretrained`` it into ``directory`` and return the transformers model."""
    model = build_hf_model(shape, seed)
    model.save_pretrained(directory, **save_kwargs)
    return model

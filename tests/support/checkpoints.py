"""Random JetMoe checkpoints, the one builder the tests, benchmarks and scripts share.

``save_checkpoint`` builds transformers' JetMoe with a fixed seed and ``save_pretrained``s it, the way a hub
checkpoint is stored (the tied ``lm_head`` is not in the file), optionally with a tokenizer trained on the
spot; the server loads it through the same path as a real ``jetmoe-8b`` directory. ``random_model`` builds our
own model directly on a device (for shapes too large to initialise through transformers on a CPU, such as the
real 8B on a GPU), and ``share_weights`` rebuilds one with other kernels over the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import JetMoeConfig
from transformers import JetMoeForCausalLM as HFJetMoe

from model.config import JetMoeModelConfig
from model.jetmoe import JetMoeForCausalLM
from model.kernels import Kernels
from model.tokenizer import Tokenizer


@dataclass(frozen=True)
class TinyShape:
    """Shape of a random test checkpoint (transformers' ``JetMoeConfig`` names)."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_key_value_heads: int = 4
    kv_channels: int = 16
    intermediate_size: int = 96
    num_local_experts: int = 8
    num_experts_per_tok: int = 2

    def with_vocab(self, vocab_size: int) -> TinyShape:
        return TinyShape(**{**asdict(self), "vocab_size": vocab_size})


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
# The engine and model benchmarks' random JetMoe (fp32 on CPU).
BENCH_SHAPE = TinyShape(
    vocab_size=32000,
    hidden_size=256,
    num_hidden_layers=4,
    num_key_value_heads=4,
    kv_channels=32,
    intermediate_size=512,
    num_local_experts=8,
    num_experts_per_tok=2,
)


def build_hf_model(shape: TinyShape, seed: int = 0, perturb: bool = True) -> HFJetMoe:
    """A random transformers JetMoe with a wide init (std 0.08: peaked logits, few greedy near-ties).

    ``perturb`` also draws nonzero biases and norm weights away from 1, so that a bug in either shows.
    """
    torch.manual_seed(seed)
    config = JetMoeConfig(**asdict(shape), initializer_range=0.08, rms_norm_eps=1e-5)
    model = HFJetMoe(config).eval()
    if perturb:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.normal_(0.0, 0.05)
                elif "layernorm" in name or name.endswith("norm.weight"):
                    param.uniform_(0.7, 1.3)
    return model


def save_checkpoint(
    shape: TinyShape, directory: Path, seed: int = 0, perturb: bool = True, **save_kwargs: object
) -> HFJetMoe:
    """Build a random model, ``save_pretrained`` it into ``directory`` and return the transformers model."""
    model = build_hf_model(shape, seed, perturb)
    model.save_pretrained(directory, **save_kwargs)
    return model


def save_checkpoint_with_tokenizer(
    shape: TinyShape,
    directory: Path,
    texts: Sequence[str],
    seed: int = 0,
    perturb: bool = True,
    exact_vocab: bool = False,
) -> tuple[HFJetMoe, Tokenizer]:
    """A Llama-style tokenizer trained on ``texts`` and a random model, both saved into ``directory``.

    The model's vocabulary is the tokenizer's size, or with ``exact_vocab`` the tokenizer is trained to
    ``shape.vocab_size`` exactly (so that every id the model can emit decodes).
    """
    from tools.train_tiny.tokenizer import train_llama_tokenizer

    train_llama_tokenizer(list(texts), shape.vocab_size, directory)
    tokenizer = Tokenizer.from_dir(directory)
    if exact_vocab and tokenizer.vocab_size != shape.vocab_size:
        raise RuntimeError(f"the trained tokenizer has {tokenizer.vocab_size} tokens, not {shape.vocab_size}")
    hf = save_checkpoint(shape.with_vocab(tokenizer.vocab_size), directory, seed, perturb)
    return hf, tokenizer


def random_model(
    config: JetMoeModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    kernels: Kernels | None = None,
    seed: int = 0,
    std: float = 0.02,
) -> JetMoeForCausalLM:
    """Our model built on the meta device, materialised on ``device`` and filled in place: N(0, std) matrices,
    unit norms, zero biases."""
    with torch.device("meta"):
        model = JetMoeForCausalLM(config, kernels)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.normal_(0.0, std, generator=gen)
    return model.eval()


def share_weights(model: JetMoeForCausalLM, kernels: Kernels) -> JetMoeForCausalLM:
    """The same network over the same weight tensors (no copy), running ``kernels``."""
    with torch.device("meta"):
        twin = JetMoeForCausalLM(model.config, kernels)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin.eval()

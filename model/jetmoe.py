"""The JetMoe network over a flat, ragged batch with a paged KV cache.

embedding -> N x (RMSNorm, mixture-of-attention, RMSNorm, mixture-of-MLP-experts) -> RMSNorm -> tied lm_head.
Module and parameter names follow the Hugging Face checkpoint so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import JetMoeModelConfig
from model.kernels.registry import Kernels, reference_kernels
from model.layers.attention import AttentionBackend, AttentionMetadata
from model.layers.experts import MoAExperts, MoEMLP
from model.layers.norm import RMSNorm
from model.layers.rotary import RotaryEmbedding

# The per-layer norms of JetMoe use this epsilon whatever config.json says; only the final norm reads it.
LAYER_NORM_EPS = 1e-6


class MixtureOfAttention(nn.Module):
    """JetMoe attention: shared K/V projection, per-expert query and output projections."""

    def __init__(self, config: JetMoeModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.backend: AttentionBackend = kernels.attention
        self.kv_proj = nn.Linear(config.hidden_size, 2 * config.kv_size, bias=False)
        self.experts = MoAExperts(
            config.hidden_size, config.kv_size, config.num_experts, config.top_k, kernels.experts
        )

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q, routing = self.experts.map(x)  # [T, K, Hkv*Dh]
        q = q.view(tokens, -1, self.num_kv_heads, self.head_dim)  # [T, K, Hkv, Dh]
        k, v = self.kv_proj(x).chunk(2, dim=-1)  # [T, Hkv*Dh] each
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        q, k = self.backend.rotate_and_write(q, k, v, rotary, kv_cache, meta)
        attn = self.backend.attend(q, k, v, kv_cache, meta, self.scale)  # [T, K, Hkv, Dh]
        return self.experts.reduce(attn.reshape(tokens, q.shape[1], -1), routing)  # [T, D]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention experts then MLP experts."""

    def __init__(self, config: JetMoeModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, LAYER_NORM_EPS, kernels.rms_norm)
        self.self_attention = MixtureOfAttention(config, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, LAYER_NORM_EPS, kernels.rms_norm)
        self.mlp = MoEMLP(
            config.hidden_size, config.intermediate_size, config.num_experts, config.top_k, kernels.experts
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual stream)``: the layer's output is their sum, added by the next norm."""
        h, residual = self.input_layernorm(x, residual)  # [T, D] each
        h, residual = self.post_attention_layernorm(self.self_attention(h, rotary, kv_cache, meta), residual)
        return self.mlp(h), residual


class JetMoeBackbone(nn.Module):
    """Embedding, decoder layers and final norm (the ``model.`` prefix of the checkpoint)."""

    def __init__(self, config: JetMoeModelConfig, kernels: Kernels) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, kernels) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, kernels.rms_norm)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta)


class JetMoeForCausalLM(nn.Module):
    """JetMoe causal LM. ``forward`` runs one flat batch through the paged cache and returns logits.

    ``kernels`` (default: the PyTorch reference, which runs on any device) is chosen once for the target device
    by whoever knows it (``model.loader.load_model`` through ``model.kernels.select_kernels``).
    """

    def __init__(self, config: JetMoeModelConfig, kernels: Kernels | None = None) -> None:
        super().__init__()
        self.config = config
        self.kernels = kernels or reference_kernels()
        self.model = JetMoeBackbone(config, self.kernels)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def attention_backend(self) -> AttentionBackend:
        """The backend every layer's attention runs on (they share one)."""
        return self.kernels.attention

    def output_weight(self) -> torch.Tensor:
        """The ``[V, D]`` output projection (the embedding when tied)."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Logits ``[N, V]`` at ``meta.logits_indices`` for ``input_ids``/``positions`` ``[T]``."""
        x = self.model.embed_tokens(input_ids)  # [T, D]
        rotary = self.model.rotary(positions, x.dtype)
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rotary, kv_cache, meta)
        assert residual is not None
        h, _ = self.model.norm(x[meta.logits_indices], residual[meta.logits_indices])  # [N, D]
        return F.linear(h, self.output_weight())  # [N, V]

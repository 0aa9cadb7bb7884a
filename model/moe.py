"""Top-k routing and expert dispatch for JetMoe's mixture of MLP experts and mixture of attention heads.

Tokens are never looped over in Python: the ``T x top_k`` (token, expert) assignments are sorted by expert,
the inputs gathered in that order, and each active expert runs one matmul over its contiguous slice
(``grouped_linear``). Expert weights are stacked ``[E, out, in]`` as in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, with the assignments sorted by expert."""

    slot_order: torch.Tensor  # [T*K] flat assignment index (token * K + k) in expert order
    token_order: torch.Tensor  # [T*K] token index of each sorted assignment
    gates: torch.Tensor  # [T*K] gate weight of each sorted assignment
    expert_counts: tuple[int, ...]  # [E] assignments per expert


class TopKRouter(nn.Module):
    """Bias-free linear router: top-k of the logits first, then softmax over the k chosen logits only."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.layer(x).float()  # [T, E]
        top_logits, top_experts = logits.topk(self.top_k, dim=1)  # [T, K]
        gates = torch.softmax(top_logits, dim=1).to(x.dtype)  # [T, K]
        flat_experts = top_experts.flatten()  # [T*K]
        slot_order = torch.argsort(flat_experts, stable=True)  # [T*K]
        counts = torch.bincount(flat_experts, minlength=self.layer.out_features)  # [E]
        return Routing(
            slot_order=slot_order,
            token_order=torch.div(slot_order, self.top_k, rounding_mode="floor"),
            gates=gates.flatten()[slot_order],
            expert_counts=tuple(counts.tolist()),
        )


class ExpertWeights(nn.Module):
    """Stacked per-expert weight ``[E, out, in]``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def forward(self, x_sorted: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        return grouped_linear(x_sorted, self.weight, counts)


def grouped_linear(x_sorted: torch.Tensor, weight: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``x_sorted`` ``[N, in]`` grouped by expert (``counts[e]`` rows each) times ``weight[e]`` ``[out, in]``."""
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[1])  # [N, out]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(x_sorted[start : start + count], weight[expert].t(), out=out[start : start + count])
            start += count
    return out


class MoEMLP(nn.Module):
    """Mixture of gated-SiLU MLP experts: ``silu(gate) * up`` then the expert's down projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.input_linear = ExpertWeights(num_experts, hidden_size, 2 * intermediate_size)
        self.output_linear = ExpertWeights(num_experts, intermediate_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        h = self.input_linear(x[routing.token_order], routing.expert_counts)  # [T*K, 2F]
        gate, up = h.chunk(2, dim=-1)  # [T*K, F] each
        y = self.output_linear(F.silu(gate) * up, routing.expert_counts)  # [T*K, D]
        y = y * routing.gates[:, None]  # [T*K, D]
        out = x.new_zeros(x.shape).index_add_(0, routing.token_order, y)  # [T, D]
        return out + self.bias


class MoAExperts(nn.Module):
    """Mixture of attention experts: per-expert query projection (``map``) and output projection (``reduce``)."""

    def __init__(self, hidden_size: int, kv_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.input_linear = ExpertWeights(num_experts, hidden_size, kv_size)
        self.output_linear = ExpertWeights(num_experts, kv_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(hidden_size))

    def map(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Queries ``[T, K, Hkv*Dh]``: slot ``k`` of a token is projected by its k-th chosen expert."""
        routing = self.router(x)
        q_sorted = self.input_linear(x[routing.token_order], routing.expert_counts)  # [T*K, Hkv*Dh]
        q = torch.empty_like(q_sorted)  # [T*K, Hkv*Dh]
        q[routing.slot_order] = q_sorted
        return q.view(x.shape[0], self.top_k, -1), routing

    def reduce(self, attn: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Gate-weighted sum over slots of each expert's output projection, plus the shared bias once."""
        tokens = attn.shape[0]
        flat = attn.reshape(tokens * self.top_k, -1)[routing.slot_order]  # [T*K, Hkv*Dh]
        y = self.output_linear(flat, routing.expert_counts) * routing.gates[:, None]  # [T*K, D]
        out = y.new_zeros(tokens, y.shape[1]).index_add_(0, routing.token_order, y)  # [T, D]
        return out + self.bias

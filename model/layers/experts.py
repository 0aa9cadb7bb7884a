"""Expert dispatch for JetMoe's mixture of MLP experts and mixture of attention heads.

Tokens are never looped over in Python: the router sorts the ``T x top_k`` (token, expert) assignments by
expert, the inputs are gathered in that order, and each stacked expert weight ``[E, out, in]`` (as in the
checkpoint) multiplies its contiguous slice of rows. How those grouped matmuls run is an ``ExpertMatmulFn``
chosen once for the device (``model.kernels``): the reference here is one ``torch.mm`` per active expert (it
reads the counts back to the host); ``grouped_linear_grouped_mm`` and the Triton grouped GEMM read only the
device offsets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.routing import ExpertCounts, RouteFn, Routing, TopKRouter, route_reference

# (x_sorted [N, in] grouped by expert, weight [E, out, in], counts) -> [N, out]
ExpertMatmulFn = Callable[[torch.Tensor, torch.Tensor, ExpertCounts], torch.Tensor]
# (expert outputs in expert order [T*K, D], routing, bias [D]) -> [T, D]
CombineFn = Callable[[torch.Tensor, Routing, torch.Tensor], torch.Tensor]


def grouped_linear_loop(x_sorted: torch.Tensor, weight: torch.Tensor, counts: ExpertCounts) -> torch.Tensor:
    """The reference: one ``torch.mm`` per expert with rows (reads ``counts`` on the host)."""
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[1])  # [N, out]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(x_sorted[start : start + count], weight[expert].t(), out=out[start : start + count])
            start += count
    return out


def grouped_linear_grouped_mm(x_sorted: torch.Tensor, weight: torch.Tensor, counts: ExpertCounts) -> torch.Tensor:
    """One ``torch._grouped_mm`` (CUTLASS) call over the device offsets: expert ``e`` takes rows
    ``offsets[e-1]:offsets[e]``. Needs 16-byte aligned rows (checked when the kernels are chosen)."""
    return torch._grouped_mm(x_sorted, weight.transpose(1, 2), offs=counts.offsets)  # [N, out]


def combine_reference(y_sorted: torch.Tensor, routing: Routing, bias: torch.Tensor) -> torch.Tensor:
    """``[T, D]``: each token's gate-weighted sum of its ``K`` expert outputs ``y_sorted`` ``[T*K, D]``, plus
    ``bias`` once."""
    y = y_sorted * routing.gates[:, None]  # [T*K, D]
    tokens = routing.token_gates.shape[0]
    out = y.new_zeros(tokens, y.shape[1]).index_add_(0, routing.token_order, y)  # [T, D]
    return out + bias


@dataclass(frozen=True)
class ExpertKernels:
    """How an expert block routes, multiplies its grouped rows and combines the experts' outputs."""

    route: RouteFn
    matmul: ExpertMatmulFn
    combine: CombineFn


REFERENCE_EXPERT_KERNELS = ExpertKernels(route_reference, grouped_linear_loop, combine_reference)


class ExpertWeights(nn.Module):
    """Stacked per-expert weight ``[E, out, in]``; ``matmul`` runs the grouped product."""

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, matmul: ExpertMatmulFn = grouped_linear_loop
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.matmul = matmul

    def forward(self, x_sorted: torch.Tensor, counts: ExpertCounts) -> torch.Tensor:
        return self.matmul(x_sorted, self.weight, counts)  # [N, out]


class MoEMLP(nn.Module):
    """Mixture of gated-SiLU MLP experts: ``silu(gate) * up`` then the expert's down projection."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        kernels: ExpertKernels | None = None,
    ) -> None:
        super().__init__()
        k = kernels or REFERENCE_EXPERT_KERNELS
        self.router = TopKRouter(hidden_size, num_experts, top_k, k.route)
        self.input_linear = ExpertWeights(num_experts, hidden_size, 2 * intermediate_size, k.matmul)
        self.output_linear = ExpertWeights(num_experts, intermediate_size, hidden_size, k.matmul)
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.combine = k.combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        h = self.input_linear(x[routing.token_order], routing.expert_counts)  # [T*K, 2F]
        gate, up = h.chunk(2, dim=-1)  # [T*K, F] each
        y = self.output_linear(F.silu(gate) * up, routing.expert_counts)  # [T*K, D]
        return self.combine(y, routing, self.bias)  # [T, D]


class MoAExperts(nn.Module):
    """Mixture of attention experts: per-expert query projection (``map``) and output projection (``reduce``)."""

    def __init__(
        self,
        hidden_size: int,
        kv_size: int,
        num_experts: int,
        top_k: int,
        kernels: ExpertKernels | None = None,
    ) -> None:
        super().__init__()
        k = kernels or REFERENCE_EXPERT_KERNELS
        self.top_k = top_k
        self.router = TopKRouter(hidden_size, num_experts, top_k, k.route)
        self.input_linear = ExpertWeights(num_experts, hidden_size, kv_size, k.matmul)
        self.output_linear = ExpertWeights(num_experts, kv_size, hidden_size, k.matmul)
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.combine = k.combine

    def map(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """Queries ``[T, K, Hkv*Dh]``: slot ``k`` of a token is projected by its k-th chosen expert."""
        routing = self.router(x)
        q_sorted = self.input_linear(x[routing.token_order], routing.expert_counts)  # [T*K, Hkv*Dh]
        q = q_sorted.index_select(0, routing.positions)  # [T*K, Hkv*Dh] back in token order
        return q.view(x.shape[0], self.top_k, -1), routing

    def reduce(self, attn: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Gate-weighted sum over slots of each expert's output projection, plus the shared bias once."""
        tokens = attn.shape[0]
        flat = attn.reshape(tokens * self.top_k, -1)[routing.slot_order]  # [T*K, Hkv*Dh]
        y = self.output_linear(flat, routing.expert_counts)  # [T*K, D]
        return self.combine(y, routing, self.bias)  # [T, D]

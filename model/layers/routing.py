"""Top-k routing: which experts each token goes to, with the (token, expert) assignments sorted by expert.

JetMoe's router is a bias-free linear; the top-k of its logits are taken first, then a softmax over those k
logits only. The ``T x k`` assignments are sorted by expert (stable), so that each expert's rows are one
contiguous slice for the grouped expert matmuls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn


class ExpertCounts(Sequence[int]):
    """Assignments per expert, read from the device only when first used.

    The per-expert loop needs Python ints (one host sync per router call); the grouped kernels only need
    ``offsets``, so on CUDA the routing never waits for the GPU. Compares equal to the tuple of its values.
    """

    def __init__(self, counts: torch.Tensor, offsets: torch.Tensor) -> None:
        self.counts = counts  # [E] int64
        self.offsets = offsets  # [E] int32 cumulative: expert e ends at row offsets[e]
        self._values: tuple[int, ...] | None = None if counts.is_cuda else tuple(counts.tolist())

    @classmethod
    def from_counts(cls, counts: Sequence[int], device: torch.device | str = "cpu") -> ExpertCounts:
        """From host counts (tests and tools)."""
        offsets = list(itertools.accumulate(counts))
        return cls(
            torch.tensor(list(counts), dtype=torch.int64, device=device),
            torch.tensor(offsets, dtype=torch.int32, device=device),
        )

    @property
    def values(self) -> tuple[int, ...]:
        if self._values is None:
            self._values = tuple(self.counts.tolist())
        return self._values

    def __len__(self) -> int:
        return self.counts.shape[0]

    def __getitem__(self, index):  # type: ignore[override]
        return self.values[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExpertCounts):
            other = other.values
        return isinstance(other, (tuple, list)) and self.values == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ExpertCounts({self.values if self._values is not None else 'on ' + str(self.counts.device)})"


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, with the assignments sorted by expert."""

    slot_order: torch.Tensor  # [T*K] flat assignment index (token * K + k) in expert order
    token_order: torch.Tensor  # [T*K] token index of each sorted assignment
    gates: torch.Tensor  # [T*K] gate weight of each sorted assignment
    expert_counts: ExpertCounts  # [E] assignments per expert, with the cumulative offsets on the device
    positions: torch.Tensor  # [T*K] row of each flat assignment in expert order (slot_order's inverse)
    token_gates: torch.Tensor  # [T, K] gate weights in token order


# (router logits [T, E], top_k, gate dtype) -> Routing
RouteFn = Callable[[torch.Tensor, int, torch.dtype], Routing]


def route_reference(logits: torch.Tensor, top_k: int, gate_dtype: torch.dtype) -> Routing:
    """Top-k of ``logits`` ``[T, E]``, softmax over the k chosen (in float32), assignments sorted by expert."""
    top_logits, top_experts = logits.float().topk(top_k, dim=1)  # [T, K]
    gates = torch.softmax(top_logits, dim=1).to(gate_dtype)  # [T, K]
    flat_experts = top_experts.flatten()  # [T*K]
    slot_order = torch.argsort(flat_experts, stable=True)  # [T*K]
    # NOTE: not bincount, which reads the maximum back to the host on CUDA.
    counts = torch.zeros(logits.shape[1], dtype=torch.int64, device=logits.device)
    counts.index_add_(0, flat_experts, torch.ones_like(flat_experts))  # [E]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
    return Routing(
        slot_order=slot_order,
        token_order=torch.div(slot_order, top_k, rounding_mode="floor"),
        gates=gates.flatten()[slot_order],
        expert_counts=ExpertCounts(counts, offsets),
        positions=_inverse(slot_order),
        token_gates=gates,
    )


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse[order[i]] = i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


class TopKRouter(nn.Module):
    """Bias-free linear router; ``impl`` turns its logits into a ``Routing`` (``route_reference`` or a kernel)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, impl: RouteFn = route_reference) -> None:
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> Routing:
        return self.impl(self.layer(x), self.top_k, x.dtype)  # logits [T, E]

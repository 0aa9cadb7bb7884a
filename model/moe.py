"""Top-k routing and expert dispatch for JetMoe's mixture of MLP experts and mixture of attention heads.

Tokens are never looped over in Python: the ``T x top_k`` (token, expert) assignments are sorted by expert,
the inputs gathered in that order, and the experts' matmuls run over their contiguous slices
(``grouped_linear``). Expert weights are stacked ``[E, out, in]`` as in the checkpoint.

Three interchangeable ways to run those matmuls (``EXPERT_PATHS``), chosen per call by ``"auto"``:

- ``"grouped_mm"``: one ``torch._grouped_mm`` (CUTLASS) call; CUDA sm_90+ in bf16, 16-byte aligned;
- ``"triton"``: one Triton grouped GEMM (``model.triton_grouped_gemm``); any other CUDA case;
- ``"loop"``: one ``torch.mm`` per active expert, the reference (and the CPU path).

The first two read the expert counts only on the device, so a forward pass on CUDA never waits for the GPU
and can be captured in a CUDA graph; the loop reads the counts back to the host.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
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
    expert_counts: ExpertCounts  # [E] assignments per expert (a tuple-like sequence of ints)
    expert_offsets: torch.Tensor  # [E] int32 cumulative counts on the device: expert e ends at row offsets[e]
    positions: torch.Tensor  # [T*K] row of each flat assignment in expert order (slot_order's inverse)
    token_gates: torch.Tensor  # [T, K] gate weights in token order


FUSED_PATHS = ("auto", "torch", "triton")


def use_triton(path: str, x: torch.Tensor) -> bool:
    """Whether a module with ``fused_path`` ``path`` runs its Triton kernel on ``x``."""
    return path == "triton" or (path == "auto" and x.is_cuda and triton_available())


def set_fused_path(model: nn.Module, path: str) -> None:
    """Set ``fused_path`` (routing, expert combine, RMSNorm: one of ``FUSED_PATHS``) on every module of ``model``."""
    if path not in FUSED_PATHS:
        raise ValueError(f"unknown fused path {path!r}; choose one of {', '.join(FUSED_PATHS)}")
    for module in model.modules():
        if hasattr(module, "fused_path"):
            setattr(module, "fused_path", path)  # noqa: B010 (modules of several classes)


class ExpertCounts(Sequence[int]):
    """Assignments per expert, read from the device only when first used.

    The loop path of ``grouped_linear`` needs Python ints (one host sync per router call); the
    ``torch._grouped_mm`` path only needs ``offsets``, so on CUDA the routing never waits for the GPU.
    Compares equal to the tuple of its values.
    """

    def __init__(self, counts: torch.Tensor, offsets: torch.Tensor) -> None:
        self.counts = counts  # [E] int64
        self.offsets = offsets  # [E] int32 cumulative
        self._values: tuple[int, ...] | None = None if counts.is_cuda else tuple(counts.tolist())

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


class TopKRouter(nn.Module):
    """Bias-free linear router: top-k of the logits first, then softmax over the k chosen logits only.

    ``fused_path`` ``"triton"`` (``"auto"`` on CUDA) routes with ``model.triton_moe.route``: two launches, the
    same assignments in the same order.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.layer = nn.Linear(hidden_size, num_experts, bias=False)
        self.fused_path = "auto"

    def forward(self, x: torch.Tensor) -> Routing:
        if use_triton(self.fused_path, x):
            return self._fused(self.layer(x), x.dtype)
        logits = self.layer(x).float()  # [T, E]
        top_logits, top_experts = logits.topk(self.top_k, dim=1)  # [T, K]
        gates = torch.softmax(top_logits, dim=1).to(x.dtype)  # [T, K]
        flat_experts = top_experts.flatten()  # [T*K]
        slot_order = torch.argsort(flat_experts, stable=True)  # [T*K]
        # NOTE: not bincount, which reads the maximum back to the host on CUDA.
        counts = torch.zeros(self.layer.out_features, dtype=torch.int64, device=x.device)
        counts.index_add_(0, flat_experts, torch.ones_like(flat_experts))  # [E]
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
        positions = _inverse(slot_order)  # [T*K]
        return Routing(
            slot_order=slot_order,
            token_order=torch.div(slot_order, self.top_k, rounding_mode="floor"),
            gates=gates.flatten()[slot_order],
            expert_counts=ExpertCounts(counts, offsets),
            expert_offsets=offsets,
            positions=positions,
            token_gates=gates,
        )

    def _fused(self, logits: torch.Tensor, dtype: torch.dtype) -> Routing:
        from model.triton_moe import route

        r = route(logits, self.top_k, dtype)
        return Routing(
            slot_order=r["slot_order"],
            token_order=r["token_order"],
            gates=r["gates"],
            expert_counts=ExpertCounts(r["counts"], r["offsets"]),
            expert_offsets=r["offsets"],
            positions=r["positions"],
            token_gates=r["token_gates"],
        )


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``inverse[order[i]] = i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.shape[0], device=order.device))


def combine_experts(y_sorted: torch.Tensor, routing: Routing, bias: torch.Tensor, path: str) -> torch.Tensor:
    """``[T, D]``: each token's gate-weighted sum of its ``K`` expert outputs ``y_sorted`` ``[T*K, D]``, plus
    ``bias`` once; one Triton kernel (``model.triton_moe.combine``) where ``path`` says so."""
    if use_triton(path, y_sorted):
        from model.triton_moe import combine

        return combine(y_sorted, routing.positions, routing.token_gates, bias)
    y = y_sorted * routing.gates[:, None]  # [T*K, D]
    tokens = routing.token_gates.shape[0]
    out = y.new_zeros(tokens, y.shape[1]).index_add_(0, routing.token_order, y)  # [T, D]
    return out + bias


EXPERT_PATHS = ("auto", "grouped_mm", "triton", "loop")


class ExpertWeights(nn.Module):
    """Stacked per-expert weight ``[E, out, in]``; ``path`` picks how the grouped matmul runs."""

    def __init__(self, num_experts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.path = "auto"

    def forward(self, x_sorted: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        return grouped_linear(x_sorted, self.weight, counts, self.path)


def set_expert_path(model: nn.Module, path: str) -> None:
    """Run every expert matmul of ``model`` through ``path`` (one of ``EXPERT_PATHS``)."""
    if path not in EXPERT_PATHS:
        raise ValueError(f"unknown expert path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")
    for module in model.modules():
        if isinstance(module, ExpertWeights):
            module.path = path


def grouped_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, counts: Sequence[int], path: str = "auto"
) -> torch.Tensor:
    """``x_sorted`` ``[N, in]`` grouped by expert (``counts[e]`` rows each) times ``weight[e]`` ``[out, in]``.

    ``path`` as in ``EXPERT_PATHS``; ``"auto"`` is ``resolve_expert_path``. The grouped paths take the
    cumulative offsets that ``ExpertCounts`` keeps on the device, so they never sync with the host.
    """
    path = resolve_expert_path(x_sorted, weight) if path == "auto" else path
    if path == "loop":
        return grouped_linear_reference(x_sorted, weight, counts)
    offsets = _device_offsets(counts, x_sorted.device)
    if path == "grouped_mm":
        return grouped_linear_grouped_mm(x_sorted, weight, offsets)
    if path == "triton":
        from model.triton_grouped_gemm import grouped_gemm

        return grouped_gemm(x_sorted, weight, offsets)
    raise ValueError(f"unknown expert path {path!r}; choose one of {', '.join(EXPERT_PATHS)}")


def resolve_expert_path(x_sorted: torch.Tensor, weight: torch.Tensor) -> str:
    """``"grouped_mm"`` where its fast kernel applies, else ``"triton"`` on CUDA, else ``"loop"``."""
    if _grouped_mm_applies(x_sorted, weight):
        return "grouped_mm"
    if x_sorted.is_cuda and triton_available():
        return "triton"
    return "loop"


def sync_free_experts(device: torch.device) -> bool:
    """Whether ``"auto"`` expert matmuls on ``device`` never read the expert counts back to the host."""
    return torch.device(device).type == "cuda" and triton_available()


@functools.cache
def triton_available() -> bool:
    try:
        import model.triton_grouped_gemm  # noqa: F401
    except ImportError:
        return False
    return True


def _device_offsets(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(counts, ExpertCounts):
        return counts.offsets
    return torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device)


def grouped_linear_reference(
    x_sorted: torch.Tensor, weight: torch.Tensor, counts: Sequence[int]
) -> torch.Tensor:
    """The per-expert loop: one ``torch.mm`` per expert with rows (reads ``counts`` on the host)."""
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[1])  # [N, out]
    start = 0
    for expert, count in enumerate(counts):
        if count:
            torch.mm(x_sorted[start : start + count], weight[expert].t(), out=out[start : start + count])
            start += count
    return out


def grouped_linear_grouped_mm(
    x_sorted: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """One ``torch._grouped_mm``: expert ``e`` takes rows ``offsets[e-1]:offsets[e]`` (``offsets`` ``[E]`` int32)."""
    return torch._grouped_mm(x_sorted, weight.transpose(1, 2), offs=offsets)  # [N, out]


def _aligned(t: torch.Tensor) -> bool:
    """Unit stride in the last dim, every other stride and the data pointer on 16 bytes."""
    size = t.element_size()
    return (
        t.stride(-1) == 1
        and t.data_ptr() % 16 == 0
        and all(stride * size % 16 == 0 for stride in t.stride()[:-1])
    )


def _grouped_mm_applies(x_sorted: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x_sorted.is_cuda
        and _has_fast_grouped_mm(x_sorted.device)
        and x_sorted.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and weight.shape[1] * weight.element_size() % 16 == 0  # rows of the output
        and _aligned(x_sorted)
        and _aligned(weight)
        and _grouped_mm_works(x_sorted.device)
    )


@functools.cache
def _has_fast_grouped_mm(device: torch.device) -> bool:
    """sm_90 or newer: below it ``torch._grouped_mm`` falls back to a loop that syncs with the host."""
    return torch.cuda.get_device_capability(device) >= (9, 0)


@functools.cache
def _grouped_mm_works(device: torch.device) -> bool:
    """One tiny probe per device (the kernel needs a recent GPU); False sends every call to the loop."""
    x = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    w = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device)
    offsets = torch.tensor([8, 16], dtype=torch.int32, device=device)
    try:
        out = grouped_linear_grouped_mm(x, w, offsets)
    except RuntimeError:
        return False
    return bool((out == 16).all())


class MoEMLP(nn.Module):
    """Mixture of gated-SiLU MLP experts: ``silu(gate) * up`` then the expert's down projection.

    ``fused_path`` picks how the experts' outputs are combined (``combine_experts``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.input_linear = ExpertWeights(num_experts, hidden_size, 2 * intermediate_size)
        self.output_linear = ExpertWeights(num_experts, intermediate_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.fused_path = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        h = self.input_linear(x[routing.token_order], routing.expert_counts)  # [T*K, 2F]
        gate, up = h.chunk(2, dim=-1)  # [T*K, F] each
        y = self.output_linear(F.silu(gate) * up, routing.expert_counts)  # [T*K, D]
        return combine_experts(y, routing, self.bias, self.fused_path)  # [T, D]


class MoAExperts(nn.Module):
    """Mixture of attention experts: per-expert query projection (``map``) and output projection (``reduce``).

    ``fused_path`` picks how the experts' outputs are combined (``combine_experts``).
    """

    def __init__(self, hidden_size: int, kv_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self.input_linear = ExpertWeights(num_experts, hidden_size, kv_size)
        self.output_linear = ExpertWeights(num_experts, kv_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(hidden_size))
        self.fused_path = "auto"

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
        return combine_experts(y, routing, self.bias, self.fused_path)  # [T, D]

"""RMSNorm fused with the residual add that precedes it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# (x, weight, eps, residual) -> (norm(x + residual), x + residual)
RMSNormFn = Callable[
    [torch.Tensor, torch.Tensor, float, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]
]


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(s), s)`` with ``s = x + residual`` (``s = x`` without one); the variance in float32."""
    if residual is not None:
        x = x + residual  # [T, D]
    h = x.float()  # [T, D]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


class RMSNorm(nn.Module):
    """RMSNorm; ``forward(x, residual)`` returns ``(norm(x + residual), x + residual)``.

    ``impl`` computes it (``rms_norm_reference`` or a fused kernel from ``model.kernels``).
    """

    def __init__(self, hidden_size: int, eps: float, impl: RMSNormFn = rms_norm_reference) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.impl = impl

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.impl(x, self.weight, self.eps, residual)

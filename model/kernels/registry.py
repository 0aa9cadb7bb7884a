"""Choosing the kernels a JetMoe forward runs: once, when the model is built for a device.

A ``Kernels`` bundle names one implementation of each swappable step: the attention backend, RMSNorm (with the
residual add), routing, the expert combine, and the grouped expert matmul. ``select_kernels`` resolves a
``KernelChoice`` (``"auto"`` or an explicit name per step) for a device, dtype and model shape:

- on CPU, ``"auto"`` is the PyTorch reference everywhere (``model.layers``);
- on CUDA, ``"auto"`` is the Triton paged decode attention with the fused rotary + K/V write, the fused Triton
  RMSNorm, routing and combine, and for the expert matmuls one ``torch._grouped_mm`` call where its fast kernel
  runs (sm_90+, bf16, 16-byte aligned rows), else the Triton grouped GEMM.

An explicit ``"triton"`` runs on CUDA, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
before the kernel modules are imported: tests only). The loader calls ``select_kernels`` with what it knows
(``model.loader.load_model``), and the network's layers receive the chosen functions at construction: nothing
is decided again per forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch

from model.config import JetMoeModelConfig
from model.layers.attention import AttentionBackend, TorchPagedAttention
from model.layers.experts import (
    CombineFn,
    ExpertKernels,
    ExpertMatmulFn,
    combine_reference,
    grouped_linear_grouped_mm,
    grouped_linear_loop,
)
from model.layers.norm import RMSNormFn, rms_norm_reference
from model.layers.routing import ExpertCounts, RouteFn, route_reference

ATTENTION_KERNELS = ("auto", "torch", "triton")
EXPERT_KERNELS = ("auto", "grouped_mm", "triton", "loop")
FUSED_KERNELS = ("auto", "torch", "triton")


class KernelError(ValueError):
    """The requested kernels cannot run on the requested device."""


@dataclass(frozen=True)
class KernelChoice:
    """Which implementation of each step to use; ``"auto"`` lets ``select_kernels`` pick for the device.

    ``attention``: ``torch`` (reference) or ``triton``; ``experts``: ``loop`` (reference), ``grouped_mm`` or
    ``triton``; ``fused`` (RMSNorm, routing, combine): ``torch`` (reference) or ``triton``.
    """

    attention: str = "auto"
    experts: str = "auto"
    fused: str = "auto"

    def __post_init__(self) -> None:
        for what, value, names in (
            ("attention backend", self.attention, ATTENTION_KERNELS),
            ("expert kernel", self.experts, EXPERT_KERNELS),
            ("fused kernels", self.fused, FUSED_KERNELS),
        ):
            if value not in names:
                raise KernelError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")


@dataclass(frozen=True)
class Kernels:
    """The implementations one model runs; ``choice`` holds the resolved names (never ``"auto"``)."""

    attention: AttentionBackend
    rms_norm: RMSNormFn
    route: RouteFn
    combine: CombineFn
    expert_matmul: ExpertMatmulFn
    choice: KernelChoice

    @property
    def experts(self) -> ExpertKernels:
        """What the expert blocks (MoE MLP, attention experts) run."""
        return ExpertKernels(self.route, self.expert_matmul, self.combine)

    @property
    def cuda_graph_safe(self) -> bool:
        """Whether a decode forward never waits for the host, so that a CUDA graph can capture it."""
        return self.attention.supports_cuda_graphs and self.choice.experts != "loop"

    def describe(self) -> str:
        c = self.choice
        return f"attention={c.attention} experts={c.experts} fused={c.fused}"


def reference_kernels() -> Kernels:
    """The PyTorch reference on every step: runs on any device, the oracle for the others."""
    return Kernels(
        attention=TorchPagedAttention(),
        rms_norm=rms_norm_reference,
        route=route_reference,
        combine=combine_reference,
        expert_matmul=grouped_linear_loop,
        choice=KernelChoice("torch", "loop", "torch"),
    )


def select_kernels(
    device: torch.device | str,
    choice: KernelChoice | None = None,
    dtype: torch.dtype | None = None,
    config: JetMoeModelConfig | None = None,
) -> Kernels:
    """The kernels ``choice`` (default all ``"auto"``) resolves to on ``device`` for weights of ``dtype`` and
    a model of shape ``config`` (both only used to decide whether ``torch._grouped_mm``'s fast kernel applies)."""
    device = torch.device(device)
    choice = choice or KernelChoice()
    reference = reference_kernels()
    attention_name = _resolve_triton(choice.attention, "torch", device, "attention backend")
    fused_name = _resolve_triton(choice.fused, "torch", device, "fused kernels")
    experts_name = _resolve_experts(choice.experts, device, dtype, config)
    attention, rms_norm, route, combine = reference.attention, reference.rms_norm, reference.route, reference.combine
    if attention_name == "triton":
        from model.kernels.triton_attention import TritonPagedAttention

        attention = TritonPagedAttention()
    if fused_name == "triton":
        from model.kernels import triton_fused, triton_moe

        rms_norm, route, combine = triton_fused.rms_norm, triton_moe.route, triton_moe.combine_routed
    return Kernels(
        attention=attention,
        rms_norm=rms_norm,
        route=route,
        combine=combine,
        expert_matmul=_expert_matmul(experts_name),
        choice=KernelChoice(attention_name, experts_name, fused_name),
    )


def _resolve_triton(name: str, reference: str, device: torch.device, what: str) -> str:
    """``"triton"`` when asked for (and able to run) or when ``"auto"`` on CUDA with triton; else the reference."""
    if name == reference or (name == "auto" and device.type != "cuda"):
        return reference
    module = _triton_module()
    if module is None:
        if name == "auto":
            return reference
        raise KernelError(f"{what} 'triton' needs a working triton package")
    if device.type != "cuda" and not module.is_interpreted():
        raise KernelError(
            f"{what} 'triton' runs on CUDA devices, not {device.type!r} (on CPU only under the Triton "
            "interpreter: set TRITON_INTERPRET=1 before the kernel modules are imported)"
        )
    return "triton"


def _resolve_experts(
    name: str, device: torch.device, dtype: torch.dtype | None, config: JetMoeModelConfig | None
) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "loop"
        if dtype is not None and config is not None and _fast_grouped_mm(device, dtype, config):
            return "grouped_mm"
        return "triton" if _triton_module() is not None else "loop"
    if name == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        raise KernelError("expert kernel 'grouped_mm' needs a PyTorch with torch._grouped_mm")
    if name == "triton":
        return _resolve_triton("triton", "loop", device, "expert kernel")
    return name


def _expert_matmul(name: str) -> ExpertMatmulFn:
    if name == "grouped_mm":
        return grouped_linear_grouped_mm
    if name == "triton":
        from model.kernels.triton_grouped_gemm import grouped_linear_triton

        return grouped_linear_triton
    return grouped_linear_loop


@functools.cache
def _triton_module() -> ModuleType | None:
    """The Triton attention module when triton imports (it pulls in the other kernel modules' dependencies)."""
    try:
        from model.kernels import triton_attention, triton_grouped_gemm, triton_moe  # noqa: F401
    except ImportError:
        return None
    return triton_attention


def _fast_grouped_mm(device: torch.device, dtype: torch.dtype, config: JetMoeModelConfig) -> bool:
    """``torch._grouped_mm``'s fast path: sm_90+ (below it falls back to a loop that syncs with the host), bf16,
    every expert matrix's rows a multiple of 16 bytes, and a probe that runs."""
    if dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    widths = (config.hidden_size, config.kv_size, config.intermediate_size, 2 * config.intermediate_size)
    if any(width * 2 % 16 for width in widths):
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and _grouped_mm_works(device)


@functools.cache
def _grouped_mm_works(device: torch.device) -> bool:
    """One tiny probe per device; False sends the expert matmuls to the Triton kernel."""
    x = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    w = torch.ones(2, 16, 16, dtype=torch.bfloat16, device=device)
    try:
        out = grouped_linear_grouped_mm(x, w, ExpertCounts.from_counts([8, 8], device))
    except RuntimeError:
        return False
    return bool((out == 16).all())

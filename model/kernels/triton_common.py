"""What the Triton kernel modules share: telling whether they run interpreted, and refusing CPU tensors."""

from __future__ import annotations

import torch


def kernel_interpreted(kernel: object) -> bool:
    """Whether ``kernel`` was decorated under the Triton CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def require_kernel_device(tensor: torch.Tensor, interpreted: bool, module: str) -> None:
    """Raise unless ``tensor`` is on CUDA or the kernels of ``module`` run under the interpreter."""
    if tensor.device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"{module} got {tensor.device.type} tensors: its Triton kernels need CUDA tensors, or "
            f"TRITON_INTERPRET=1 set before {module} is imported (CPU interpreter, tests only)"
        )

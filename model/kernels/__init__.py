"""The kernels a JetMoe forward can run, and the one place where they are chosen (``select_kernels``).

``registry`` resolves a ``KernelChoice`` into a ``Kernels`` bundle for a device; the ``triton_*`` modules hold
the CUDA kernels (Triton): paged decode attention, fused RMSNorm and rotary + K/V write, routing and combine,
and the grouped expert GEMM. The PyTorch reference implementations live in ``model.layers``.
"""

from model.kernels.registry import KernelChoice, KernelError, Kernels, reference_kernels, select_kernels

__all__ = ["KernelChoice", "KernelError", "Kernels", "reference_kernels", "select_kernels"]

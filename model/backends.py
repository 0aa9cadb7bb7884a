"""Choosing an attention backend for a device.

``JetMoeForCausalLM(config)`` defaults to the torch reference (``TorchPagedAttention``), which runs anywhere;
the loader builds the model on the meta device, so whoever knows the target device picks the backend and
passes it in::

    backend = select_attention_backend(torch.device("cuda"))  # TritonPagedAttention when triton imports
    model = load_model(path, device="cuda", backend=backend)

Names: ``"auto"`` (Triton on CUDA when ``triton`` imports, else the torch reference), ``"torch"`` and
``"triton"``. Triton on a CPU device only works under the Triton interpreter (``TRITON_INTERPRET=1`` in the
environment before ``model.triton_attention`` is first imported); that is for tests, not for serving.
"""

from __future__ import annotations

import torch

from model.attention import AttentionBackend, TorchPagedAttention

BACKEND_NAMES = ("auto", "torch", "triton")


class BackendError(ValueError):
    """The requested attention backend cannot run on the requested device."""


def select_attention_backend(device: torch.device | str, name: str = "auto") -> AttentionBackend:
    """The attention backend ``name`` for ``device``; see the module docstring for the choices."""
    device = torch.device(device)
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchPagedAttention()
    try:
        from model.triton_attention import TritonPagedAttention, is_interpreted
    except ImportError as exc:  # triton missing or broken
        if name == "auto":
            return TorchPagedAttention()
        raise BackendError(f"attention backend 'triton' needs a working triton package: {exc}") from exc
    if device.type != "cuda" and not is_interpreted():
        raise BackendError(
            f"attention backend 'triton' runs on CUDA devices, not {device.type!r} (on CPU only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 before model.triton_attention is imported)"
        )
    return TritonPagedAttention()

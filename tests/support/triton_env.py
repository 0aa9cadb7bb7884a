"""Import this first in a Triton test module: without CUDA it switches on Triton's CPU interpreter.

The interpreter must be on before a kernel module (``model.triton_*``) is first imported, since ``@triton.jit``
decides at decoration time; this module does that at its own import, then skips the test module if ``triton``
is missing. In CI (``CI=true``) a missing triton, or kernels that cannot run, fail instead: the interpreter
suites must run there.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

IN_CI = os.environ.get("CI", "").lower() == "true"

if IN_CI:
    import triton  # noqa: F401  (CI installs the test extra, which has triton: missing is a failure there)
else:
    pytest.importorskip("triton")


def skip_unless_kernels_run(module: ModuleType) -> None:
    """Skip the calling test module when ``module``'s kernels can run neither on CUDA nor interpreted (it was
    imported before the interpreter was switched on)."""
    if not CUDA and not module.is_interpreted():
        if IN_CI:
            raise RuntimeError(f"{module.__name__} was imported without TRITON_INTERPRET=1: its tests cannot run")
        pytest.skip(f"no CUDA and {module.__name__} was imported without TRITON_INTERPRET=1",
                    allow_module_level=True)

"""Compiling Triton kernels for a GPU without one: Triton's bundled ptxas, in a child process.

The child runs without ``TRITON_INTERPRET`` (the interpreter would replace the kernels), compiles each kernel
for ``sm_<arch>`` with the types and constexprs a real GPU run would use, writes the cubins, and the test reads
their resource usage with the bundled ``cuobjdump``: a kernel that spills registers to the stack would be slow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# The child's preamble: ``compile_kernel(name, fn, types, constexprs, arch=90)`` writes ``<out>/<name>.cubin``
# and prints its path. Parameters not named in ``types`` or ``constexprs`` are i32 scalars.
PREAMBLE = textwrap.dedent(
    """
    import inspect, sys
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_kernel(name, fn, types, constexprs, arch=90):
        options = {"num_warps": constexprs.pop("num_warps", 4)}
        names = inspect.signature(fn.fn).parameters
        sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        path = f"{sys.argv[1]}/{name}.cubin"
        open(path, "wb").write(kernel.asm["cubin"])
        print(path)
    """
)


def bundled_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_kernels(body: str, out_dir: Path) -> list[Path]:
    """Run ``PREAMBLE + body`` in a child process; the cubins it wrote (skips without a bundled ptxas)."""
    if not bundled_tool("ptxas").exists():
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(out_dir / "cache")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", PREAMBLE + textwrap.dedent(body), str(out_dir)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [Path(p) for p in done.stdout.split()]


def assert_no_spills(cubins: list[Path]) -> None:
    """Every cubin uses no stack (no register spills); skipped without a bundled cuobjdump."""
    cuobjdump = bundled_tool("cuobjdump")
    if not cuobjdump.exists():
        return
    for cubin in cubins:
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
        assert "STACK:0 " in usage, f"{cubin.name} spills registers: {usage.strip().splitlines()[-1]}"

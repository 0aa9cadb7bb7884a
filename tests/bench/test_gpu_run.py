"""The GPU run prepared on CPU: its scripts import on the GPU machine's packages, its check covers every Triton
kernel, its results survive failures, and its one device command passes as a ``--tiny`` CPU dry run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import check_gpu
from benchmarks.gpu.check_gpu import ErrorStats, within_reference
from benchmarks.gpu.recorder import Recorder, Results

ROOT = Path(__file__).resolve().parents[2]
# What the GPU machine lacks until the carried wheels are installed: the HTTP layer's packages, and the
# engine's structured-output packages.
HTTP_ONLY = ("fastapi", "uvicorn", "starlette", "sse_starlette", "openai")
ENGINE_EXTRAS = ("pydantic", "pydantic_core", "xgrammar")
COMMAND = "bash benchmarks/gpu/run_all.sh"


def import_hidden(modules: str, hidden: tuple[str, ...]) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {hidden!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError, as on the GPU machine\n"
        f"import {modules}\n"
        "leaked = sorted(n for n, m in sys.modules.items() if m is not None and n.split('.')[0] in\n"
        f"                {set(hidden)!r})\n"
        "assert not leaked, leaked\n"
        "print('imported')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_check_and_benchmark_import_without_the_server_packages() -> None:
    done = import_hidden("benchmarks.gpu.check_gpu, benchmarks.gpu.bench_gpu", HTTP_ONLY + ENGINE_EXTRAS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "imported"


def test_engine_scripts_import_without_the_http_packages() -> None:
    # The engine needs pydantic and xgrammar (carried); the HTTP app is imported only when serve_gpu serves.
    done = import_hidden("benchmarks.gpu.bundled_parity, benchmarks.gpu.serve_gpu", HTTP_ONLY)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "imported"


def test_carried_wheels_name_every_missing_package() -> None:
    carried = (ROOT / "benchmarks" / "gpu" / "carried.txt").read_text()
    no_deps = (ROOT / "benchmarks" / "gpu" / "carried-no-deps.txt").read_text()
    names = {line.split("==")[0] for line in (carried + no_deps).splitlines() if "==" in line}
    assert names >= {"fastapi", "uvicorn", "pydantic", "pydantic-core", "starlette", "sse-starlette", "openai",
                     "xgrammar", "apache-tvm-ffi"}


def test_check_tests_every_triton_kernel_module_and_no_cpu_only_suite() -> None:
    modules = sorted(p.stem for p in (ROOT / "model" / "kernels").glob("triton_*.py") if p.stem != "triton_common")
    assert modules == ["triton_attention", "triton_fused", "triton_grouped_gemm", "triton_moe"]
    sources = {f: (ROOT / f).read_text() for f in check_gpu.PYTEST_FILES}
    for module in modules:
        assert any(re.search(rf"\b{module}\b", text) for text in sources.values()), module
    assert "tests/engine/test_decode_graphs.py" in sources and "tests/kernels/test_grouped_linear.py" in sources
    assert check_gpu.KV_SIZING_TEST not in sources  # it runs alone
    assert not any(f.startswith(("tests/model/", "tests/api/")) for f in sources)  # CPU-only suites


def stats(percentile: float, agree: int, largest: float = 0.05) -> ErrorStats:
    return ErrorStats(largest=largest, percentile=percentile, argmax_agree=agree, tokens=200)


def test_pass_rule_judges_the_percentile_and_argmax_not_the_largest_error() -> None:
    reference = stats(percentile=0.010, agree=198)
    assert within_reference(stats(0.012, 198, largest=3.0), reference)  # one routing flip: a large max only
    assert within_reference(stats(0.021, 196), reference)  # within 2x (+1e-3) and 1% of the tokens
    assert not within_reference(stats(0.0215, 198), reference)
    assert not within_reference(stats(0.010, 195), reference)


def test_error_stats_percentile_and_argmax() -> None:
    import torch

    oracle = [torch.zeros(4, 100), torch.zeros(1, 100)]  # 500 logits: the 99th percentile is the 495th
    oracle[0][:, 3] = 1.0
    oracle[1][:, 7] = 1.0
    logits = [t.clone() for t in oracle]
    logits[0][0, 5] = 2.0  # one token's argmax flips; 1 of 500 logits is off by 2
    logits[1][0, 9] = 0.5  # and 5 more are off by 0.25: the 99th percentile
    logits[1][0, 10:14] = 0.25
    got = check_gpu.error_stats(logits, oracle)
    assert got == ErrorStats(largest=2.0, percentile=0.25, argmax_agree=4, tokens=5)


def test_recorder_saves_after_every_section_and_keeps_going(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    rec = Recorder(Results(device="cpu", shapes={}), path)
    assert json.loads(path.read_text())["decode"] == []
    assert rec.section("first", lambda: 1) == 1

    def broken() -> int:
        raise AttributeError("no such API in this transformers")

    assert rec.section("second", broken) is None
    rec.results.decode.append({"who": "ours", "batch": 1})
    assert rec.section("third", lambda: 3) == 3
    saved = json.loads(path.read_text())
    assert saved["notes"] == ["second: AttributeError: no such API in this transformers"]
    assert saved["decode"] == [{"who": "ours", "batch": 1}]


def test_readme_gives_the_one_device_command() -> None:
    readme = (ROOT / "benchmarks" / "gpu" / "README.md").read_text()
    assert f"OUT=$OUT {COMMAND}" in readme


@pytest.mark.timeout(300)
def test_device_command_dry_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PY": sys.executable, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    done = subprocess.run([*COMMAND.split(), "--tiny"], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-4000:]
    for stage in ("install", "check", "kernel-tests", "kv-sizing", "bench", "serve"):
        assert f"end {stage}: exit 0" in summary
    assert summary.rstrip().endswith("all stages passed")
    collected = (out / "kernel-tests.log").read_text()
    for name in check_gpu.PYTEST_FILES:
        assert name in collected  # collected only: the kernel suites are not rerun on CPU
    assert "bf16 logits: PASS" in (out / "check.log").read_text()
    assert "KV sizing test: PASS" in (out / "kv-sizing.log").read_text()
    bench = json.loads((out / "bench_gpu.json").read_text())
    assert {row["who"] for row in bench["decode"]} == {"ours+graphs", "ours+triton", "transformers"}
    assert set(bench["prefill"]) == {"gflop", "ours", "transformers"} and bench["notes"] == []
    served = json.loads((out / "serve_gpu.json").read_text())["served"]
    assert served["engine"]["output_tokens"] == served["http"]["output_tokens"] == 8 * 4

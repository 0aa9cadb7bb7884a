"""GPU correctness check: the CPU test files natively on CUDA, then bf16 logits on the real JetMoe-8B shapes.

``python -m tests.gpu.check_gpu`` runs

1. ``pytest tests/test_triton_attention.py tests/test_grouped_linear.py tests/test_model_parity.py`` (on a CUDA
   machine the Triton kernels are compiled, the ``tl.dot`` and bf16 cases and the ``torch._grouped_mm`` test
   run);
2. one random-weight model with the JetMoe-8B shapes through a ragged scenario (prefills of different lengths,
   decode steps, a mixed chunk + decode step) in four variants with identical inputs:
   fp32 + torch reference attention (the oracle), bf16 + torch reference, bf16 + Triton, and bf16 + torch
   reference with the per-expert loop instead of ``torch._grouped_mm``. It prints each variant's largest logit
   error against the oracle and fails when Triton's error exceeds twice the bf16 reference's (same for
   grouped_mm against the loop), i.e. when the fast paths add error beyond bf16 rounding.

Exit status 0 only when both parts pass. ``--tiny`` does the same on CPU (Triton interpreter) with a 2-layer
model: a dry run of the script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from contextlib import contextmanager

import torch

from model import moe
from model.attention import TorchPagedAttention
from model.attention_metadata import build_flat_batch
from model.jetmoe import JetMoeForCausalLM
from tests.gpu.bench_gpu import JETMOE_8B, TINY, build_model, new_caches, set_backend, setup_device

PYTEST_FILES = (
    "tests/test_triton_attention.py",
    "tests/test_grouped_linear.py",
    "tests/test_model_parity.py",
)
ERROR_FACTOR = 2.0  # a fast path may add at most this factor over the bf16 reference's own error
ERROR_SLACK = 1e-3


def run_pytest() -> bool:
    command = [sys.executable, "-m", "pytest", *PYTEST_FILES, "-q", "-rs", "--durations=5"]
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, check=False).returncode == 0


def scenario(vocab_size: int, tiny: bool) -> list[tuple[list[int], list[int], list[int]]]:
    """Steps of (token ids, query lens, context lens) over three sequences; all inputs fixed in advance."""
    gen = torch.Generator().manual_seed(7)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab_size, (n,), generator=gen).tolist()

    prompts = [10, 14, 5] if tiny else [24, 40, 9]
    steps = [(ids(sum(prompts)), list(prompts), list(prompts))]
    context = list(prompts)
    for _ in range(3 if tiny else 8):
        context = [c + 1 for c in context]
        steps.append((ids(3), [1, 1, 1], list(context)))
    chunk = 6  # sequence 0 gets a chunk of new tokens while the others decode
    context = [context[0] + chunk, context[1] + 1, context[2] + 1]
    steps.append((ids(chunk + 2), [chunk, 1, 1], list(context)))
    context = [c + 1 for c in context]
    steps.append((ids(3), [1, 1, 1], list(context)))
    return steps


def run_scenario(model: JetMoeForCausalLM, steps, block_size: int) -> list[torch.Tensor]:
    device = model.output_weight().device
    longest = max(ctx for _, _, contexts in steps for ctx in contexts)
    per_seq = -(-longest // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq))[::-1] for i in range(3)]  # out of order
    caches = new_caches(model, 3 * per_seq, block_size, fill=False)
    out = []
    for ids, query_lens, contexts in steps:
        positions, meta = build_flat_batch(
            query_lens, contexts, tables, block_size, device=device, all_logits=True
        )
        out.append(model(torch.tensor(ids, device=device), positions, caches, meta).float())
    return out


@contextmanager
def loop_experts():
    """Force the per-expert loop instead of ``torch._grouped_mm``."""
    original = moe._grouped_mm_applies
    moe._grouped_mm_applies = lambda *args: False
    try:
        yield
    finally:
        moe._grouped_mm_applies = original


def cast_model(model: JetMoeForCausalLM, dtype: torch.dtype) -> JetMoeForCausalLM:
    device = model.output_weight().device
    with torch.device("meta"):
        copy = JetMoeForCausalLM(model.config)
    copy = copy.to(dtype).to_empty(device=device)
    copy.load_state_dict(model.state_dict())  # copies and casts
    return copy.eval()


def max_error(logits: list[torch.Tensor], oracle: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits, oracle))


def compare_logits(tiny: bool, device: torch.device) -> bool:
    from model.backends import select_attention_backend

    config = TINY if tiny else JETMOE_8B
    block_size = 4 if tiny else 16
    steps = scenario(config.vocab_size, tiny)
    print(f"\nbf16 logits on {'tiny' if tiny else 'JetMoe-8B'} shapes, {len(steps)} steps", flush=True)
    oracle_model = build_model(config, device, torch.float32, TorchPagedAttention(), seed=3)
    oracle = run_scenario(oracle_model, steps, block_size)
    model = cast_model(oracle_model, torch.bfloat16)
    del oracle_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    triton_backend = select_attention_backend(device, "triton")
    runs = {}
    set_backend(model, TorchPagedAttention())
    runs["bf16 torch-ref"] = run_scenario(model, steps, block_size)
    with loop_experts():
        runs["bf16 torch-ref, expert loop"] = run_scenario(model, steps, block_size)
    set_backend(model, triton_backend)
    runs["bf16 triton"] = run_scenario(model, steps, block_size)
    scale = max(t.abs().max().item() for t in oracle)
    errors = {name: max_error(logits, oracle) for name, logits in runs.items()}
    print(f"  oracle: fp32 + torch reference; largest |logit| {scale:.4f}")
    for name, err in errors.items():
        agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(runs[name], oracle))
        total = sum(t.shape[0] for t in oracle)
        print(
            f"  {name:<28} max |error| {err:.5f}  ({err / scale:.2%} of max |logit|), argmax agrees {agree}/{total}"
        )
    direct = max_error(runs["bf16 triton"], runs["bf16 torch-ref"])
    print(f"  bf16 triton vs bf16 torch-ref directly: {direct:.5f}")
    grouped_mm = device.type == "cuda" and moe._grouped_mm_works(device)
    print(f"  torch._grouped_mm used by the bf16 runs: {grouped_mm}")
    bound = ERROR_FACTOR * errors["bf16 torch-ref"] + ERROR_SLACK
    ok_triton = errors["bf16 triton"] <= bound
    ok_gmm = errors["bf16 torch-ref"] <= ERROR_FACTOR * errors["bf16 torch-ref, expert loop"] + ERROR_SLACK
    print(f"  triton within {ERROR_FACTOR} x reference error: {'PASS' if ok_triton else 'FAIL'}")
    print(f"  grouped_mm within {ERROR_FACTOR} x loop error: {'PASS' if ok_gmm else 'FAIL'}")
    return ok_triton and ok_gmm


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="dry run on CPU with a 2-layer model")
    parser.add_argument("--skip-pytest", action="store_true", help="only the logits comparison")
    args = parser.parse_args(argv)
    device = setup_device(args.tiny)
    tests_ok = True if args.skip_pytest else run_pytest()
    logits_ok = compare_logits(args.tiny, device)
    print(f"\npytest: {'PASS' if tests_ok else 'FAIL'}; bf16 logits: {'PASS' if logits_ok else 'FAIL'}")
    return 0 if tests_ok and logits_ok else 1


if __name__ == "__main__":
    sys.exit(main())

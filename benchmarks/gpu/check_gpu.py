"""GPU correctness check: the CPU test files natively on CUDA, then bf16 logits on the real JetMoe-8B shapes.

``python -m benchmarks.gpu.check_gpu`` runs

1. ``pytest`` on the test files of every Triton kernel module and of the decode graphs (``PYTEST_FILES``): on a
   CUDA machine the Triton kernels are compiled, the ``tl.dot``, bf16 and ``torch._grouped_mm`` cases run, and
   decode graphs are really captured and replayed; then the KV-sizing test (``KV_SIZING_TEST``) alone, since it
   reads the device's free memory and another process on the GPU would move it;
2. one random-weight model with the JetMoe-8B shapes through a ragged scenario (prefills of different lengths,
   decode steps, a mixed chunk + decode step) in the ``VARIANTS`` with identical inputs: the fp32 reference
   (torch attention, per-expert loop, PyTorch ops) is the oracle; the bf16 reference, each fast path on its
   own (``torch._grouped_mm``, the Triton grouped GEMM, the fused Triton norms, routing and combine), the model as served on CUDA,
   and the same with decode steps replayed from CUDA graphs. It prints each variant's logit errors against
   the oracle and fails a fast path whose 99th-percentile error exceeds twice the bf16 reference's, or whose
   argmax agrees with the oracle's on fewer tokens than the reference's does (less a 1% slack): it adds error
   beyond bf16 rounding. (The largest error is printed, not judged: one routing flip decides it.)
3. the bundled model's greedy output for 32 prompts through the engine on CUDA (fp32 with and without CUDA
   graphs, and bf16) against the CPU reference engine (``benchmarks.gpu.bundled_parity``).

Exit status 0 only when every part passes. ``--only kernels|kv|logits`` runs one part (``logits`` includes
the bundled model), so that the kernel tests can run in the background meanwhile. ``--tiny`` is a CPU dry
run: the test files only collected, parts 2 with a 2-layer model (Triton interpreter, graphs replayed eagerly).

Imports only what the GPU machine has (torch, triton, transformers; no HTTP server packages).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from benchmarks.gpu.bench_gpu import JETMOE_8B, TINY, new_caches, setup_device
from model.jetmoe import JetMoeForCausalLM
from model.kernels import KernelChoice, select_kernels
from model.kernels.registry import reference_kernels
from server.engine.worker.batch import build_flat_batch
from server.engine.worker.decode_graphs import DecodeGraphs
from tests.support.checkpoints import random_model, share_weights

# One test file per Triton kernel module (model/kernels/triton_*.py), torch._grouped_mm, and the decode graphs.
PYTEST_FILES = (
    "tests/kernels/test_triton_attention.py",
    "tests/kernels/test_triton_fused.py",
    "tests/kernels/test_triton_grouped_gemm.py",
    "tests/kernels/test_triton_moe.py",
    "tests/kernels/test_grouped_linear.py",
    "tests/engine/test_decode_graphs.py",
)
KV_SIZING_TEST = "tests/engine/test_kv_cache_sizing.py"
ERROR_FACTOR = 2.0  # a fast path's 99th-percentile error may be at most this factor over the bf16 reference's
ERROR_SLACK = 1e-3
PERCENTILE = 0.99
ARGMAX_SLACK = 0.01  # share of the tokens whose argmax may flip beyond the reference's (near-ties)


def run_pytest(files: Sequence[str], collect_only: bool) -> bool:
    mode = ["--collect-only"] if collect_only else ["-rs", "--durations=5"]
    command = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", *mode]
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


def run_scenario(model: JetMoeForCausalLM, steps, block_size: int, graphs: bool = False) -> list[torch.Tensor]:
    """Logits of every step at every token; with ``graphs`` the all-decode steps replay a decode graph."""
    device = model.output_weight().device
    longest = max(ctx for _, _, contexts in steps for ctx in contexts)
    per_seq = -(-longest // block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq))[::-1] for i in range(3)]  # out of order
    caches = new_caches(model, 3 * per_seq + 1, block_size, fill=False)  # the last block pads graph rows
    replay = None
    if graphs:
        replay = DecodeGraphs(model, caches, (1, 2, 4), per_seq, block_size, 3 * per_seq, device.type == "cuda")
    out = []
    for ids, query_lens, contexts in steps:
        if replay is not None and replay.fits(query_lens):
            out.append(replay.run(ids, contexts, tables).float().clone())
            continue
        positions, meta = build_flat_batch(
            model.attention_backend, query_lens, contexts, tables, block_size, device=device, all_logits=True
        )
        out.append(model(torch.tensor(ids, device=device), positions, caches, meta).float())
    return out


def cast_model(model: JetMoeForCausalLM, dtype: torch.dtype) -> JetMoeForCausalLM:
    device = model.output_weight().device
    with torch.device("meta"):
        copy = JetMoeForCausalLM(model.config, model.kernels)
    copy = copy.to(dtype).to_empty(device=device)
    copy.load_state_dict(model.state_dict())  # copies and casts
    return copy.eval()


def max_error(logits: list[torch.Tensor], oracle: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits, oracle))


@dataclass(frozen=True)
class ErrorStats:
    """How far a variant's logits are from the oracle's, over every logit of every step."""

    largest: float
    percentile: float  # the PERCENTILE quantile of |error|
    argmax_agree: int
    tokens: int


def error_stats(logits: list[torch.Tensor], oracle: list[torch.Tensor]) -> ErrorStats:
    errors = torch.cat([(a - b).abs().flatten() for a, b in zip(logits, oracle)])  # [sum T*V]
    rank = max(1, math.ceil(PERCENTILE * errors.numel()))
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum().item()) for a, b in zip(logits, oracle))
    tokens = sum(t.shape[0] for t in oracle)
    return ErrorStats(errors.max().item(), errors.kthvalue(rank).values.item(), agree, tokens)


def within_reference(stats: ErrorStats, reference: ErrorStats) -> bool:
    """The pass rule: no more error than bf16 rounding gives the reference, at the percentile and in argmax."""
    slack = max(1, math.ceil(ARGMAX_SLACK * stats.tokens))
    close = stats.percentile <= ERROR_FACTOR * reference.percentile + ERROR_SLACK
    return close and stats.argmax_agree >= reference.argmax_agree - slack


# (name, attention, expert matmul path, fused-op path, decode graphs); the first is the bf16 reference the rest
# are held to. Fused ops: RMSNorm + residual, routing, expert combine.
VARIANTS = (
    ("bf16 reference", "torch", "loop", "torch", False),
    ("bf16 torch-ref, auto experts", "torch", "auto", "torch", False),
    ("bf16 torch-ref, triton experts", "torch", "triton", "torch", False),
    ("bf16 torch-ref, triton fused ops", "torch", "loop", "triton", False),
    ("bf16 triton (as served)", "triton", "auto", "auto", False),
    ("bf16 triton + decode graphs", "triton", "auto", "auto", True),
)


def compare_logits(tiny: bool, device: torch.device) -> bool:
    config = TINY if tiny else JETMOE_8B
    block_size = 4 if tiny else 16
    steps = scenario(config.vocab_size, tiny)
    print(f"\nbf16 logits on {'tiny' if tiny else 'JetMoe-8B'} shapes, {len(steps)} steps", flush=True)
    oracle_model = random_model(config, device, torch.float32, reference_kernels(), seed=3)
    oracle = run_scenario(oracle_model, steps, block_size)
    model = cast_model(oracle_model, torch.bfloat16)
    del oracle_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    scale = max(t.abs().max().item() for t in oracle)
    print(f"  oracle: fp32, torch attention, expert loop, torch ops; largest |logit| {scale:.4f}", flush=True)
    runs: dict[str, list[torch.Tensor]] = {}
    stats: dict[str, ErrorStats] = {}
    seen: dict[tuple[str, bool], str] = {}
    ok = True
    for name, attention, experts, fused, graphs in VARIANTS:
        if device.type != "cuda" and "triton" in (experts, fused):
            continue  # the CPU interpreter computes bf16 wrongly (tl.dot, casts); pytest covers it in fp32
        try:
            kernels = select_kernels(device, KernelChoice(attention, experts, fused), torch.bfloat16, config)
            twin = seen.get((kernels.describe(), graphs))
            if twin is not None:  # e.g. "auto" experts on CPU are the loop: the same run again
                print(f"  {name:<32} same kernels as {twin!r}: not run again", flush=True)
                continue
            seen[(kernels.describe(), graphs)] = name
            runs[name] = run_scenario(share_weights(model, kernels), steps, block_size, graphs=graphs)
        except Exception as exc:  # noqa: BLE001 - one broken variant must not hide the others
            ok = False
            print(f"  {name:<32} FAIL: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            continue
        st = stats[name] = error_stats(runs[name], oracle)
        print(f"  {name:<32} p{PERCENTILE * 100:.0f} |error| {st.percentile:.5f}, max {st.largest:.5f} "
              f"({st.largest / scale:.2%} of max |logit|), argmax {st.argmax_agree}/{st.tokens}  "
              f"[{kernels.describe()}]", flush=True)
    if "bf16 reference" not in stats:
        return False
    served, replayed = runs.get("bf16 triton (as served)"), runs.get("bf16 triton + decode graphs")
    if served is not None:
        print(f"  served vs bf16 reference directly: {max_error(served, runs['bf16 reference']):.5f}")
    if served is not None and replayed is not None:
        print(f"  decode graphs vs eager directly: {max_error(replayed, served):.5f}")
    reference = stats["bf16 reference"]
    for name, st in list(stats.items())[1:]:
        passed = within_reference(st, reference)
        ok = ok and passed
        print(f"  {name:<32} within the reference's error: {'PASS' if passed else 'FAIL'}", flush=True)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="dry run on CPU with a 2-layer model")
    parser.add_argument("--only", choices=("kernels", "kv", "logits"), help="run one part")
    parser.add_argument("--skip-pytest", action="store_true", help="no pytest (kernels nor KV sizing)")
    args = parser.parse_args(argv)
    device = setup_device(args.tiny)
    parts = {"kernels", "kv", "logits"} if args.only is None else {args.only}
    if args.skip_pytest:
        parts -= {"kernels", "kv"}
    verdicts = {}
    if "kernels" in parts:
        verdicts["kernel tests"] = run_pytest(PYTEST_FILES, collect_only=args.tiny)
    if "kv" in parts:
        verdicts["KV sizing test"] = run_pytest([KV_SIZING_TEST], collect_only=False)
    if "logits" in parts:
        verdicts["bf16 logits"] = compare_logits(args.tiny, device)
        if device.type == "cuda":
            from benchmarks.gpu.bundled_parity import check_bundled_greedy

            verdicts["bundled greedy"] = check_bundled_greedy()
    print("\n" + "; ".join(f"{name}: {'PASS' if ok else 'FAIL'}" for name, ok in verdicts.items()), flush=True)
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end generation benchmark: our continuous-batching engine against transformers on one workload.

    python -m benchmarks.bench_engine [--threads 2] [--repeats 1] [--num-requests 64] [--skip-generate-batch]
                                      [--profile]

Workload: ``--num-requests`` requests arriving together, random prompts of 9 to 121 token ids, output lengths
drawn uniformly from 16 to 256 (greedy, EOS ignored, exactly ``max_tokens`` each), on a random fp32 JetMoe
(hidden 256, 4 layers, 8 experts top-2, 4 KV heads of 32, intermediate 512, vocab 32000). Only the tokens each
request asked for count as useful output, whatever a system computes beyond them.

Systems (all in this process, on the same weights):
- ours: ``LLMEngine``; add every request, then ``step()`` until done.
- transformers ``generate``: the whole batch left-padded, ``max_new_tokens`` = ``min_new_tokens`` = the longest
  request's length.
- transformers continuous batching, twice: ``generate_batch`` (one ``max_new_tokens`` for every request, so the
  longest), and the same manager fed request by request with each request's own ``max_new_tokens``
  (``ContinuousBatchingManager.add_request(max_new_tokens=...)``, which ``generate_batch`` uses inside).

Then the fraction of the fp32 GEMM roofline our engine reaches (FLOPs per token = 2 x active parameters,
lm_head included, attention scores excluded), and a greedy check of our first 4 requests against transformers
``generate`` run one request at a time without padding. ``--profile`` adds cProfile and torch.profiler tables of
one engine run.

Timing: every system first runs a short warm-up (8 requests, 16 tokens). Then ``--repeats`` rounds each run every
baseline once, each right after a run of ours (ours gets at least 3 runs); medians are reported. Run it on an idle
machine: with ``--threads`` equal to the core count, another busy process slows the many small OpenMP-parallel ops
of both engines by 10x or more (the load average is printed). About 1.5 minutes with ``--repeats 1`` on 2 cores,
about 3.5 minutes with ``--repeats 3``.

The checkpoint's tokenizer is trained with vocab 32000 (= the model's vocab) on the Python standard library's
sources: our detokenizer is handed every generated id and needs each to be in the tokenizer.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, JetMoeConfig
from transformers import JetMoeForCausalLM as HFJetMoe

from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from tests.support.checkpoints import BENCH_SHAPE, save_checkpoint_with_tokenizer
from tests.support.tokenizers import stdlib_texts

BLOCK = 16
CB_PAGE = 64
MAX_BATCH_TOKENS = 2048
PROMPT_LENS = (9, 121)
OUTPUT_LENS = (16, 256)
NUM_CHECKED = 4
TIE_GAP = 1e-4
GEMM_N = 2048


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def useful_tokens(self) -> int:
        return sum(self.max_tokens)


@dataclass
class Result:
    system: str
    seconds: list[float]
    note: str = ""
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def make_workload(num_requests: int, vocab: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*PROMPT_LENS))] for _ in range(num_requests)]
    return Workload(prompts, [rng.randint(*OUTPUT_LENS) for _ in range(num_requests)])


def build_checkpoint(directory: str) -> HFJetMoe:
    """Random JetMoe + a Llama-style tokenizer with exactly the model's vocab, saved into ``directory``."""
    for recursive in (False, True):  # the top-level stdlib (~5 MB) is enough for 32000 pieces on CPython 3.11
        try:
            hf, _ = save_checkpoint_with_tokenizer(
                BENCH_SHAPE, Path(directory), stdlib_texts(recursive), seed=0, perturb=False, exact_vocab=True
            )
            return hf
        except RuntimeError:
            if recursive:
                raise
    raise AssertionError("unreachable")


# --- ours -------------------------------------------------------------------------------------------------


def engine_config(directory: str, work: Workload) -> EngineConfig:
    needed = sum(math.ceil((len(p) + n) / BLOCK) for p, n in zip(work.prompts, work.max_tokens))
    blocks = max(needed + 16, 4096 // BLOCK)  # the engine wants max_model_len (4096) to fit once
    return EngineConfig(
        model=directory, device="cpu", dtype="float32", max_num_seqs=64,
        max_num_batched_tokens=MAX_BATCH_TOKENS, num_kv_blocks=blocks, block_size=BLOCK,
    )


def run_ours(config: EngineConfig, model, tokenizer, work: Workload, steps: list[int] | None = None) -> list[list[int]]:
    """One full run on a fresh engine (fresh KV cache and prefix cache); returns each request's tokens."""
    engine = LLMEngine(config, model, tokenizer)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(work.prompts))}
    reasons: dict[str, str | None] = {}
    for i, (prompt, n) in enumerate(zip(work.prompts, work.max_tokens)):
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    num_steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        num_steps += 1
    if steps is not None:
        steps.append(num_steps)
    bad = [r for r, n in zip(outputs, work.max_tokens) if len(outputs[r]) != n or reasons.get(r) != "length"]
    if bad:
        raise RuntimeError(f"requests {bad[:5]} did not get exactly max_tokens tokens (finish {reasons.get(bad[0])})")
    return [outputs[str(i)] for i in range(len(work.prompts))]


# --- transformers -----------------------------------------------------------------------------------------


def run_hf_generate(hf: HFJetMoe, work: Workload) -> torch.Tensor:
    longest = max(work.max_tokens)
    width = max(len(p) for p in work.prompts)
    ids = torch.zeros(len(work.prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(work.prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest,
            do_sample=False, pad_token_id=0,
        )
    if out.shape[1] != width + longest:
        raise RuntimeError(f"generate stopped early: {out.shape[1] - width} of {longest} tokens")
    return out[:, width:]


def cb_config(work: Workload, per_request: bool):
    from transformers import ContinuousBatchingConfig

    lens = work.max_tokens if per_request else [max(work.max_tokens)] * len(work.max_tokens)
    pages = sum(math.ceil((len(p) + n) / CB_PAGE) for p, n in zip(work.prompts, lens))
    return ContinuousBatchingConfig(
        page_size=CB_PAGE, num_blocks=pages + 32, max_batch_tokens=MAX_BATCH_TOKENS,
        max_requests_per_batch=len(work.prompts), use_cuda_graph=False,
    )


def cb_generation_config(max_new_tokens: int) -> GenerationConfig:
    # eos -1: no EOS (every request runs to its max_new_tokens), as ``ignore_eos`` does for ours
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)


def run_generate_batch(hf: HFJetMoe, work: Workload) -> list[list[int]]:
    """``generate_batch``: one max_new_tokens (the longest) for every request."""
    longest = max(work.max_tokens)
    results = hf.generate_batch(
        work.prompts, generation_config=cb_generation_config(longest),
        continuous_batching_config=cb_config(work, per_request=False),
    )
    outs = [r.generated_tokens for r in results.values()]
    if len(outs) != len(work.prompts) or any(len(o) != longest for o in outs):
        raise RuntimeError(f"generate_batch returned {len(outs)} results, lengths {sorted({len(o) for o in outs})}")
    return outs


def run_cb_per_request(hf: HFJetMoe, work: Workload) -> list[list[int]]:
    """The continuous-batching manager fed with each request's own max_new_tokens."""
    results = {}
    with hf.continuous_batching_context_manager(
        generation_config=cb_generation_config(max(work.max_tokens)),
        continuous_batching_config=cb_config(work, per_request=True), block=True, timeout=5,
    ) as manager:
        for i, (prompt, n) in enumerate(zip(work.prompts, work.max_tokens)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
        while len(results) < len(work.prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError(f"the manager stopped with {len(results)} of {len(work.prompts)} results")
    outs = [results[f"r{i}"].generated_tokens for i in range(len(work.prompts))]
    errors = [results[f"r{i}"].error for i in range(len(work.prompts)) if results[f"r{i}"].error]
    if errors or any(len(o) != n for o, n in zip(outs, work.max_tokens)):
        raise RuntimeError(f"per-request CB: errors {errors[:2]}, wrong lengths")
    return outs


def fresh_hf(directory: str) -> HFJetMoe:
    return HFJetMoe.from_pretrained(directory, dtype=torch.float32).eval()


# --- roofline and correctness ----------------------------------------------------------------------------


def gemm_flops(repeats: int = 10) -> float:
    """Median FLOP/s of a large fp32 GEMM."""
    a, b = torch.randn(GEMM_N, GEMM_N), torch.randn(GEMM_N, GEMM_N)
    out = torch.empty(GEMM_N, GEMM_N)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * GEMM_N**3 / statistics.median(times)


def active_params_per_token(cfg: JetMoeConfig) -> int:
    d, k, e = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_local_experts
    kv = cfg.num_key_value_heads * cfg.kv_channels  # one MoA expert's width (heads per expert x head dim)
    kv_proj = d * 2 * kv
    moa = k * (d * kv + kv * d)
    mlp = k * (d * 2 * cfg.intermediate_size + cfg.intermediate_size * d)  # GLU input, then output
    routers = 2 * d * e
    return cfg.num_hidden_layers * (kv_proj + moa + mlp + routers) + cfg.vocab_size * d


def check_greedy(hf: HFJetMoe, work: Workload, ours: list[list[int]]) -> tuple[bool, str]:
    """Our tokens vs transformers ``generate`` alone and unpadded, up to the reference's first near-tie."""
    details, ok = [], True
    for i in range(min(NUM_CHECKED, len(work.prompts))):
        n = work.max_tokens[i]
        with torch.inference_mode():
            out = hf.generate(
                torch.tensor([work.prompts[i]]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, output_scores=True, return_dict_in_generate=True,
            )
        ref = out.sequences[0, len(work.prompts[i]):].tolist()
        checked = n
        for step, scores in enumerate(out.scores):
            top = scores[0].float().topk(2).values
            if (top[0] - top[1]).item() < TIE_GAP:
                checked = step + 1  # the tied step itself may still pick either
                break
        first_diff = next((s for s in range(checked) if ref[s] != ours[i][s]), None)
        if first_diff is not None and not (first_diff == checked - 1 and checked < n):
            ok = False
            details.append(f"req {i}: first diff at {first_diff}/{n}")
        else:
            details.append(f"req {i}: {checked}/{n} compared")
    return ok, "; ".join(details)


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    same = sum(a == list(b)[: len(a)] for a, b in zip(ours, theirs))
    return f"{same}/{len(ours)} requests token-identical to ours"


# --- profiling --------------------------------------------------------------------------------------------


def profile_ours(config: EngineConfig, model, tokenizer, work: Workload) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_ours(config, model, tokenizer, work)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats(key).print_stats(25)
        print(f"\n### cProfile, one engine run, top 25 by {key}\n")
        print("\n".join(line for line in stream.getvalue().splitlines() if line.strip())[:6000])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_ours(config, model, tokenizer, work)
    print("\n### torch.profiler, one engine run, top 25 ops by self CPU time\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# --- main -------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench_engine] {message}", file=sys.stderr, flush=True)


@dataclass
class System:
    name: str
    run: Callable[[Workload], list[list[int]]]
    note: str = ""
    result: Result | None = None
    output: list[list[int]] | None = None

    def timed_run(self, work: Workload) -> None:
        """One timed run; a failure is recorded (and the system dropped), never raised."""
        if self.result is None:
            self.result = Result(self.name, [])
        if self.result.error:
            return
        try:
            start = time.perf_counter()
            self.output = self.run(work)
            self.result.seconds.append(time.perf_counter() - start)
            log(f"{self.name}: {self.result.seconds[-1]:.2f} s")
        except Exception as exc:
            traceback.print_exc()
            self.result.error = f"{type(exc).__name__}: {exc}"


def warm_up(system: System, work: Workload) -> None:
    """A short run on a few requests: first-call costs (lazy imports, kernel set-up) stay out of the timings."""
    small = Workload(work.prompts[:8], [OUTPUT_LENS[0]] * min(8, len(work.prompts)))
    system.timed_run(small)
    assert system.result is not None
    system.result.seconds.clear()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="timed rounds; each round runs every baseline once, each preceded by a run of ours",
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--skip-generate-batch", action="store_true", help="skip transformers' continuous batching")
    parser.add_argument("--profile", action="store_true", help="also profile one run of our engine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    if load_before > 0.5:
        log(f"load average {load_before:.2f}: other processes are busy, timings will be skewed")
    work = make_workload(args.num_requests, BENCH_SHAPE.vocab_size)
    with tempfile.TemporaryDirectory() as directory:
        hf = build_checkpoint(directory)
        model = load_model(directory, dtype="float32", device="cpu")
        tokenizer = Tokenizer.from_dir(directory)
        config = engine_config(directory, work)
        steps: list[int] = []
        ours = System("ours (LLMEngine)", lambda w: run_ours(config, model, tokenizer, w, steps))
        longest = max(work.max_tokens)
        baselines = [
            System("transformers generate (padded batch)", lambda w: run_hf_generate(hf, w).tolist(),
                   f"max_new_tokens={longest} for all"),
        ]
        if not args.skip_generate_batch:
            cb_models = {}  # a fresh copy each: the manager switches the model's attention implementation

            def on_copy(fn: Callable[[HFJetMoe, Workload], list[list[int]]], key: str):
                return lambda w: fn(cb_models.setdefault(key, fresh_hf(directory)), w)

            baselines += [
                System("transformers generate_batch (CB)", on_copy(run_generate_batch, "batch"),
                       "one max_new_tokens: the longest"),
                System("transformers CB, per-request max_new_tokens", on_copy(run_cb_per_request, "manager"),
                       "manager.add_request(max_new_tokens=L)"),
            ]
        for system in [ours, *baselines]:
            warm_up(system, work)
        if ours.result is not None and ours.result.error:
            raise SystemExit(f"our engine failed: {ours.result.error}")
        peaks = [gemm_flops()]
        # Interleaved (ours, baseline, ours, baseline, ...): other load on the machine hits every system alike.
        for _ in range(args.repeats):
            for system in baselines:
                ours.timed_run(work)
                system.timed_run(work)
        while len(ours.result.seconds) < 3 and not ours.result.error:
            ours.timed_run(work)
        if ours.result.error:
            raise SystemExit(f"our engine failed: {ours.result.error}")
        peaks.append(gemm_flops())
        ours.note = f"{steps[-1]} steps"
        for system in baselines:
            if system.output is not None:
                system.note += "; " + agreement(ours.output, system.output)
        ok, detail = check_greedy(hf, work, ours.output)
        log(f"greedy check done at {time.perf_counter() - started:.0f} s")
        if args.profile:
            profile_ours(config, model, tokenizer, work)

    results = []
    for system in [ours, *baselines]:
        system.result.note = system.note
        results.append(system.result)
    ours_result = ours.result
    peak = max(peaks)
    useful = work.useful_tokens
    base = useful / ours_result.median
    print(f"\n## Engine benchmark: {len(work.prompts)} requests, prompts {PROMPT_LENS[0]}-{PROMPT_LENS[1]} "
          f"(total {sum(map(len, work.prompts))}), outputs {OUTPUT_LENS[0]}-{OUTPUT_LENS[1]} "
          f"(useful {useful}, longest {max(work.max_tokens)}), {args.threads} threads, "
          f"{args.repeats} round(s), ours run before each baseline; medians\n")
    print("| system | wall s (median) | all runs s | useful output tok/s | ratio vs ours | note |")
    print("|---|---:|---|---:|---:|---|")
    for r in results:
        if r.error:
            print(f"| {r.system} | - | - | - | - | FAILED: {r.error[:200]} |")
            continue
        rate = useful / r.median
        runs = ", ".join(f"{t:.2f}" for t in r.seconds)
        print(f"| {r.system} | {r.median:.2f} | {runs} | {rate:.0f} | {rate / base:.2f}x | {r.note} |")
    flops_per_token = 2 * active_params_per_token(hf.config)
    print(f"\nGEMM fp32 {GEMM_N}x{GEMM_N}x{GEMM_N}: {peak / 1e9:.1f} GFLOP/s (best of the medians before and "
          f"after the runs: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})")
    print(f"FLOPs per generated token (2 x active params, lm_head included, attention excluded): "
          f"{flops_per_token / 1e6:.2f} MFLOP")
    print(f"ours: {base:.0f} tok/s x {flops_per_token / 1e6:.2f} MFLOP = {base * flops_per_token / 1e9:.2f} GFLOP/s "
          f"= {base * flops_per_token / peak:.1%} of roofline (output tokens only)")
    all_tokens = useful + sum(map(len, work.prompts))
    print(f"ours incl. prompt tokens: {all_tokens * flops_per_token / ours_result.median / peak:.1%} of roofline")
    print(f"greedy check (first {NUM_CHECKED} requests vs transformers generate, unpadded): "
          f"{'OK' if ok else 'MISMATCH'} ({detail})")
    print(f"total benchmark time {time.perf_counter() - started:.0f} s; 1-min load average {load_before:.2f} at start, "
          f"{os.getloadavg()[0]:.2f} at end on {os.cpu_count()} CPUs (other processes skew CPU timings)")


if __name__ == "__main__":
    main()

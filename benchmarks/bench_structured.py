"""Cost of grammar-constrained decoding on the engine workload: half the requests JSON-schema-constrained
against none, interleaved in one run.

    python -m benchmarks.bench_structured [--threads 2] [--repeats 3] [--num-requests 64] [--bundled]

Workload: ``benchmarks/bench_engine.py``'s (``--num-requests`` random prompts of 9 to 121 tokens, 16 to 256
output tokens each, greedy, EOS ignored) on its random fp32 JetMoe with a 32000-piece tokenizer (``--bundled``:
the bundled 4096-token model instead, quicker). In the constrained variant every other request must match a
JSON schema of records (bounded integers, length-bounded strings, enums, booleans) with at least 100 records,
which no request can finish within its ``max_tokens``: both variants generate exactly the same number of tokens,
so their throughput compares like for like. The free requests' tokens must be identical in both variants.

Reported: output tokens per second of each variant (median of ``--repeats`` rounds, the order of the two
variants alternating per round) and their ratio per round, per wall second and per CPU second of this process
(on a shared machine the second is the steadier one); the bitmask cost per step (filling the rows'
bitmasks and applying them, timed inside the sampler) as a share of the step; grammar compile times: the
tokenizer tables (once per process), a schema's first compile, and a cached lookup.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import server.engine.sampler as sampler_module
from benchmarks.bench_engine import build_checkpoint, engine_config, make_workload
from model.bundled import BUNDLED_MODEL_DIR
from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.structured import StructuredSpec

RECORD = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
    "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}}, "required": ["id", "name", "tags", "ok"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"records": {"type": "array", "items": RECORD, "minItems": 100}},
          "required": ["records"], "additionalProperties": False}


class MaskTimer:
    """Wraps the sampler's bitmask step: seconds spent in it, on steps with constrained rows."""

    def __init__(self) -> None:
        self._inner: Callable = sampler_module.apply_grammar_bitmask
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.steps = 0
        self.rows = 0

    def __call__(self, logits: torch.Tensor, grammars) -> torch.Tensor:
        constrained = sum(g is not None for g in grammars)
        if not constrained:
            return self._inner(logits, grammars)
        started = time.perf_counter()
        out = self._inner(logits, grammars)
        self.seconds += time.perf_counter() - started
        self.steps += 1
        self.rows += constrained
        return out


def run(engine: LLMEngine, work, constrained: bool) -> tuple[float, float, int, list[list[int]], int]:
    """One variant on a fresh engine: wall and CPU seconds, output tokens, each request's tokens, steps."""
    spec = StructuredSpec.json_schema(SCHEMA)
    engine.grammars.compile(spec)  # cached before timing: compile cost is reported on its own
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(work.prompts))}
    started, cpu_started = time.perf_counter(), time.process_time()
    for i, (prompt, n) in enumerate(zip(work.prompts, work.max_tokens)):
        structured = spec if constrained and i % 2 else None
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                          structured=structured))
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
        steps += 1
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    total = sum(len(t) for t in tokens.values())
    if total != work.useful_tokens:
        raise RuntimeError(f"{total} tokens generated, {work.useful_tokens} asked for")
    return seconds, cpu, total, [tokens[str(i)] for i in range(len(work.prompts))], steps


def compile_times(engine: LLMEngine) -> tuple[float, float, float]:
    """Seconds: tokenizer tables, first compile of the schema, a cached lookup (fresh compiler)."""
    compiler = type(engine.grammars)(engine.tokenizer.hf, engine.model.config.vocab_size)
    started = time.perf_counter()
    compiler.tokenizer_info  # noqa: B018  (builds the tables)
    tables = time.perf_counter() - started
    spec = StructuredSpec.json_schema(SCHEMA)
    started = time.perf_counter()
    compiler.compile(spec)
    first = time.perf_counter() - started
    started = time.perf_counter()
    compiler.compile(StructuredSpec.json_schema(SCHEMA))
    return tables, first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--bundled", action="store_true", help="the bundled model (vocab 4096) instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(BUNDLED_MODEL_DIR) if args.bundled else tmp
        if not args.bundled:
            build_checkpoint(directory)
        model = load_model(directory, dtype="float32", device="cpu")
        tokenizer = Tokenizer.from_dir(directory)
        work = make_workload(args.num_requests, model.config.vocab_size)
        config = engine_config(directory, work)
        timer = MaskTimer()
        sampler_module.apply_grammar_bitmask = timer  # type: ignore[assignment]
        run(LLMEngine(config, model, tokenizer), make_workload(8, model.config.vocab_size, seed=1), True)  # warm-up
        timer.reset()
        results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
        free_tokens: dict[bool, list[list[int]]] = {}
        constrained_seconds, constrained_steps = 0.0, 0
        for round_ in range(args.repeats):
            for constrained in ((False, True) if round_ % 2 == 0 else (True, False)):
                seconds, cpu, total, tokens, steps = run(LLMEngine(config, model, tokenizer), work, constrained)
                results[constrained].append((seconds, cpu, total))
                free_tokens[constrained] = tokens[::2]
                if constrained:
                    constrained_seconds += seconds
                    constrained_steps += steps
        tables, first, cached = compile_times(LLMEngine(config, model, tokenizer))
    report(args, model.config.vocab_size, work, results, free_tokens, timer, constrained_seconds,
           constrained_steps, (tables, first, cached))


def report(args, vocab, work, results, free_tokens, timer, constrained_seconds, constrained_steps,
           compiles) -> None:
    rate = {c: [total / seconds for seconds, _, total in results[c]] for c in results}
    cpu_rate = {c: [total / cpu for _, cpu, total in results[c]] for c in results}
    ratios = [half / none for half, none in zip(rate[True], rate[False])]
    cpu_ratios = [half / none for half, none in zip(cpu_rate[True], cpu_rate[False])]
    print(f"workload: {args.num_requests} requests, {work.useful_tokens} output tokens, vocab {vocab}, "
          f"{args.threads} threads, {args.repeats} rounds")
    print(f"none constrained: {statistics.median(rate[False]):8.1f} tok/s  (rounds: "
          + ", ".join(f"{r:.1f}" for r in rate[False]) + ")")
    print(f"half constrained: {statistics.median(rate[True]):8.1f} tok/s  (rounds: "
          + ", ".join(f"{r:.1f}" for r in rate[True]) + ")")
    print("ratio half/none per round: " + ", ".join(f"{r:.3f}" for r in ratios)
          + f"; median {statistics.median(ratios):.3f}")
    print("ratio per CPU second (less sensitive to other processes): "
          + ", ".join(f"{r:.3f}" for r in cpu_ratios) + f"; median {statistics.median(cpu_ratios):.3f}")
    print(f"free requests token-identical in both variants: {free_tokens[True] == free_tokens[False]}")
    if timer.steps:
        per_step = timer.seconds / timer.steps * 1e3
        step_ms = constrained_seconds / constrained_steps * 1e3
        print(f"bitmask per step: {per_step:.3f} ms ({timer.rows / timer.steps:.1f} constrained rows; "
              f"{timer.seconds / timer.rows * 1e6:.1f} us per row), {per_step / step_ms:.1%} of a "
              f"{step_ms:.1f} ms step")
    tables, first, cached = compiles
    print(f"compile: tokenizer tables {tables * 1e3:.1f} ms (once), schema first use {first * 1e3:.2f} ms, "
          f"cached {cached * 1e6:.1f} us")


if __name__ == "__main__":
    main()

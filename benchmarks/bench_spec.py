"""Speculative decoding benchmark: n-gram proposals against plain decoding and transformers' prompt lookup.

    python -m benchmarks.bench_spec [--threads 2] [--tokens 128] [--k 5] [--lookup-min 1] [--lookup-max 4]
                                    [--repeats 3] [--single-prompts 4] [--batch 16]

Model: the bundled ``tiny-jetmoe`` (``model.bundled``), fp32 on CPU. Every request is greedy and generates exactly
``--tokens`` tokens (EOS ignored).

Workloads:
- copy-heavy: prompts whose text the continuation repeats. The bundled model is too small to copy a passage
  verbatim, but it does keep repeating its own phrases; so each prompt is a slice of a standard-library module's
  source followed by the model's own greedy continuation of it (computed once, before timing), and the timed
  continuation goes on repeating text found in the prompt.
- no-copy: prompts of 64 random token ids (what the model writes after them may still repeat itself; the
  acceptance rate column says how much).

Systems, per workload, at batch 1 (``--single-prompts`` prompts one after another) and at ``--batch`` (that many
prompts at once): ours without speculation, ours with ``--speculative-config`` n-gram (``--k`` tokens, lookup
``--lookup-min``..``--lookup-max``); at batch 1 also transformers ``generate`` greedy and
``generate(prompt_lookup_num_tokens=k)`` (transformers' own n-gram size, 2). Each repeat runs every system once
(interleaved, so that other load on the machine hits all alike); the table shows medians. Ours with speculation
must give exactly our tokens without it (checked). Run on an idle machine: the load average is printed.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import JetMoeForCausalLM as HFJetMoe

from model.bundled import BUNDLED_MODEL_DIR
from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.sampling_params import SamplingParams
from server.engine.spec import SpeculativeConfig

SOURCES = ("json.decoder", "textwrap", "collections", "argparse", "string", "fractions", "csv", "shlex")
SNIPPET_CHARS = 400
RANDOM_PROMPT_TOKENS = 64
BLOCK = 16
TARGETS = {("copy-heavy", "single"): 1.8, ("copy-heavy", "batch"): 1.3, ("no-copy", "single"): 0.95,
           ("no-copy", "batch"): 0.95}


def log(message: str) -> None:
    print(f"[bench_spec] {message}", file=sys.stderr, flush=True)


@dataclass
class Run:
    """One system on one workload and batch: wall times of each repeat, and speculation's counters."""

    seconds: list[float] = field(default_factory=list)
    tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    draft_tokens: int = 0
    accepted: int = 0
    drafts: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / statistics.median(self.seconds)


class Ours:
    """Fresh engines over one loaded model (fresh KV and prefix caches for every run)."""

    def __init__(self, spec: SpeculativeConfig | None, model, tokenizer: Tokenizer, max_len: int, batch: int) -> None:
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.config = EngineConfig(model=str(BUNDLED_MODEL_DIR), device="cpu", dtype="float32", block_size=BLOCK,
                                   num_kv_blocks=batch * (max_len // BLOCK + 2) + 8, max_model_len=max_len,
                                   max_num_seqs=max(batch, 1), speculative_config=spec)

    def generate(self, prompts: list[list[int]], tokens: int, run: Run) -> list[list[int]]:
        engine = LLMEngine(self.config, self.model, self.tokenizer)
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id].extend(out.new_token_ids)
        stats = engine.stats()
        run.drafts += stats.spec_decode_num_drafts
        run.draft_tokens += stats.spec_decode_num_draft_tokens
        run.accepted += stats.spec_decode_num_accepted_tokens
        return [outputs[str(i)] for i in range(len(prompts))]


def hf_generate(hf: HFJetMoe, lookup: int | None) -> Callable[[list[list[int]], int, Run], list[list[int]]]:
    def generate(prompts: list[list[int]], tokens: int, run: Run) -> list[list[int]]:
        (prompt,) = prompts  # prompt lookup takes one sequence at a time
        extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        with torch.inference_mode():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              pad_token_id=0, **extra)
        return [out[0, len(prompt):].tolist()]

    return generate


def timed(generate: Callable[[list[list[int]], int, Run], list[list[int]]], groups: list[list[list[int]]],
          tokens: int, run: Run) -> None:
    """One repeat: every group of prompts through ``generate`` in turn (one group = one batch)."""
    started = time.perf_counter()
    outputs = [out for group in groups for out in generate(group, tokens, run)]
    run.seconds.append(time.perf_counter() - started)
    run.tokens = sum(map(len, outputs))
    run.outputs = outputs


def copy_heavy_prompts(plain: Ours, tokenizer: Tokenizer, count: int, tokens: int) -> list[list[int]]:
    """Source slices followed by the model's own greedy continuation of them."""
    snippets = []
    for name in SOURCES:
        source = inspect.getsource(importlib.import_module(name))
        snippets += [source[i : i + SNIPPET_CHARS] for i in range(2000, 2000 + 2 * 3000, 3000)]
    heads = [tokenizer.encode(text) for text in snippets[:count]]
    continued = plain.generate(heads, tokens, Run())
    return [head + tail for head, tail in zip(heads, continued)]


def random_prompts(tokenizer: Tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, tokenizer.vocab_size) for _ in range(RANDOM_PROMPT_TOKENS)] for _ in range(count)]


def bench(systems: dict[str, Callable], groups: list[list[list[int]]], tokens: int, repeats: int) -> dict[str, Run]:
    runs = {name: Run() for name in systems}
    for generate in systems.values():  # warm-up: one short run each
        generate(groups[0][:1], 8, Run())
    for _ in range(repeats):
        for name, generate in systems.items():
            timed(generate, groups, tokens, runs[name])
    for run in runs.values():  # counters summed over repeats -> per repeat
        run.drafts, run.draft_tokens, run.accepted = (v // repeats for v in (run.drafts, run.draft_tokens, run.accepted))
    return runs


def rows_of(workload: str, shape: str, runs: dict[str, Run], batch: int) -> list[str]:
    base = runs["ours"].rate
    same = runs["ours+spec"].outputs == runs["ours"].outputs
    lines = []
    for name, run in runs.items():
        acceptance = mean = "-"
        if run.draft_tokens:
            acceptance = f"{run.accepted / run.draft_tokens:.0%}"
            mean = f"{1 + run.accepted / run.drafts:.2f}"
        note = ("tokens identical to ours" if same else "TOKENS DIFFER from ours") if name == "ours+spec" else ""
        lines.append(f"| {workload} | {batch} | {name} | {run.rate:.1f} | {run.rate / base:.2f}x | {acceptance} | "
                     f"{mean} | {note} |")
    return lines


def verdicts(results: dict[tuple[str, str], dict[str, Run]]) -> list[str]:
    lines = []
    for (workload, shape), runs in results.items():
        target = TARGETS[(workload, shape)]
        ratio = runs["ours+spec"].rate / runs["ours"].rate
        met = "met" if ratio >= target else "NOT met"
        lines.append(f"- {workload}, {shape}: {ratio:.2f}x against >= {target}x: {met}")
        if shape == "single" and "transformers+lookup" in runs:
            theirs = runs["transformers+lookup"].rate
            faster = "met" if runs["ours+spec"].rate > theirs else "NOT met"
            lines.append(f"- {workload}, single: ours+spec {runs['ours+spec'].rate:.1f} tok/s against transformers "
                         f"prompt lookup {theirs:.1f} tok/s: faster {faster}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--lookup-min", type=int, default=1)
    parser.add_argument("--lookup-max", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-prompts", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    log(f"load average {load:.2f}" + (": other processes are busy, timings will be skewed" if load > 0.5 else ""))
    tokenizer = Tokenizer.from_dir(BUNDLED_MODEL_DIR)
    model = load_model(BUNDLED_MODEL_DIR, dtype="float32", device="cpu")
    hf = HFJetMoe.from_pretrained(BUNDLED_MODEL_DIR, dtype=torch.float32).eval()
    spec = SpeculativeConfig(args.k, args.lookup_min, args.lookup_max)
    count = max(args.batch, args.single_prompts)
    max_len = SNIPPET_CHARS + 3 * args.tokens + 64
    workloads = {"copy-heavy": copy_heavy_prompts(Ours(None, model, tokenizer, max_len, count), tokenizer, count,
                                                  args.tokens),
                 "no-copy": random_prompts(tokenizer, count)}
    results: dict[tuple[str, str], dict[str, Run]] = {}
    lines = []
    for workload, prompts in workloads.items():
        log(f"{workload}: batch 1")
        single = {"ours": Ours(None, model, tokenizer, max_len, 1).generate,
                  "ours+spec": Ours(spec, model, tokenizer, max_len, 1).generate,
                  "transformers": hf_generate(hf, None), "transformers+lookup": hf_generate(hf, args.k)}
        results[(workload, "single")] = runs = bench(single, [[p] for p in prompts[: args.single_prompts]],
                                                     args.tokens, args.repeats)
        lines += rows_of(workload, "single", runs, 1)
        log(f"{workload}: batch {args.batch}")
        batched = {"ours": Ours(None, model, tokenizer, max_len, args.batch).generate,
                   "ours+spec": Ours(spec, model, tokenizer, max_len, args.batch).generate}
        results[(workload, "batch")] = runs = bench(batched, [prompts[: args.batch]], args.tokens, args.repeats)
        lines += rows_of(workload, "batch", runs, args.batch)
    print(f"\n## Speculative decoding: bundled tiny-jetmoe, fp32 CPU, {args.threads} threads, {args.tokens} tokens "
          f"per request, n-gram k={args.k}, lookup {args.lookup_min}..{args.lookup_max}, median of {args.repeats}, "
          f"load average {load:.2f} before / {os.getloadavg()[0]:.2f} after\n")
    print("| workload | batch | system | tok/s | vs ours | acceptance rate | mean accepted length | note |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    print("\n".join(lines))
    print("\nTargets:\n" + "\n".join(verdicts(results)))


if __name__ == "__main__":
    main()

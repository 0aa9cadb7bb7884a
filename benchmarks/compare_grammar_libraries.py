"""xgrammar against llguidance on this project's tokenizer: compile time and per-step mask cost.

    pip install xgrammar llguidance   # only this comparison needs both
    python -m benchmarks.compare_grammar_libraries [--model DIR] [--steps 64] [--threads 1]

For a few JSON schemas of the shapes clients send (flat, nested with $defs/$ref, enums and optionals, arrays
with bounds, string patterns) it reports per library: the compile time of a first use (median over fresh
compilers), the time to fill one row's token bitmask along a valid 64-token path (median per step) and the
time to apply a `[64, V]` bitmask to float32 logits. Both libraries run with whitespace-free JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

import torch

from model.tokenizer import Tokenizer

SCHEMAS: dict[str, dict] = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"], "additionalProperties": False},
    "nested_refs": {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/Point"}, "end": {"$ref": "#/$defs/Point"},
                       "label": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["start", "end", "label"], "additionalProperties": False},
    "enum_array": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]},
                       "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                "minItems": 1, "maxItems": 4},
                       "score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["colour", "tags", "score"], "additionalProperties": False},
    "pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                 "ok": {"type": "boolean"}},
                "required": ["zip", "ok"], "additionalProperties": False},
}


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def bench_xgrammar(hf, vocab: int, schema: str, steps: int, seed: int) -> tuple[float, float, float]:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compile_ms = _median_ms(lambda: xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
        schema, any_whitespace=False), 3)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(schema, any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    rng, fill = random.Random(seed), []
    for _ in range(steps):
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask, 0)
        fill.append(time.perf_counter() - start)
        token = _pick(bitmask[0], vocab, rng)
        if token is None or not matcher.accept_token(token) or matcher.is_terminated():
            matcher.reset()
    batch = xgr.allocate_token_bitmask(64, vocab)
    logits = torch.randn(64, vocab)
    apply_ms = _median_ms(lambda: xgr.apply_token_bitmask_inplace(logits, batch), 20)
    return compile_ms, statistics.median(fill) * 1e3, apply_ms


def bench_llguidance(hf, vocab: int, schema: str, steps: int, seed: int) -> tuple[float, float, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def first_use() -> None:  # llguidance compiles lazily: the first mask is part of compiling
        llguidance.torch.fill_next_token_bitmask(llguidance.LLMatcher(tokenizer, grammar), bitmask, 0)

    compile_ms = _median_ms(first_use, 3)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    rng, fill = random.Random(seed), []
    for _ in range(steps):
        start = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        fill.append(time.perf_counter() - start)
        token = _pick(bitmask[0], vocab, rng)
        if token is None or not matcher.consume_token(token) or matcher.is_stopped():
            matcher.reset()
    batch = llguidance.torch.allocate_token_bitmask(64, vocab)
    logits = torch.randn(64, vocab)
    apply_ms = _median_ms(lambda: llguidance.torch.apply_token_bitmask_inplace(logits, batch), 20)
    return compile_ms, statistics.median(fill) * 1e3, apply_ms


def _pick(row: torch.Tensor, vocab: int, rng: random.Random) -> int | None:
    bits = ((row.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:vocab]
    allowed = bits.nonzero().flatten().tolist()
    return rng.choice(allowed) if allowed else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="model/assets/tiny-jetmoe")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hf = Tokenizer.from_dir(args.model).hf
    vocab = len(hf)
    print(f"tokenizer: {args.model}, {vocab} tokens")
    print(f"{'schema':<12} {'library':<11} {'compile ms':>11} {'mask ms/step':>13} {'apply [64,V] ms':>16}")
    for name, schema in SCHEMAS.items():
        text = json.dumps(schema)
        for library, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            compile_ms, fill_ms, apply_ms = bench(hf, vocab, text, args.steps, 0)
            print(f"{name:<12} {library:<11} {compile_ms:>11.2f} {fill_ms:>13.4f} {apply_ms:>16.4f}")


if __name__ == "__main__":
    main()

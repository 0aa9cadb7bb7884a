"""Forward-pass benchmark: our paged JetMoe against transformers' JetMoe on the same random checkpoint.

    python -m benchmarks.bench_model [--threads 2] [--repeats 5]

Workloads: a prefill of 16 x 128 tokens, and 64 single-token decodes with 128-token contexts. Prints the
median time of each and the ratio (transformers time / ours; above 1 means we are faster).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

from model.layers.attention import allocate_kv_cache
from model.loader import load_model
from server.engine.worker.batch import build_flat_batch
from tests.support.checkpoints import BENCH_SHAPE, save_checkpoint

# The engine benchmark's model shape (hidden 256, 4 layers, 8 experts top-2, 4 KV heads of 32, vocab 32000).
BLOCK = 16


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours_prefill(model, cache, ids: torch.Tensor) -> Callable[[], object]:
    seqs, length = ids.shape
    tables = [list(range(i * 9, i * 9 + length // BLOCK + 1)) for i in range(seqs)]
    positions, meta = build_flat_batch(model.attention_backend, [length] * seqs, [length] * seqs, tables, BLOCK)
    flat = ids.flatten()
    return lambda: model(flat, positions, cache, meta)


def ours_decode(model, cache, ids: torch.Tensor) -> Callable[[], object]:
    seqs, length = ids.shape
    tables = [list(range(i * 9, i * 9 + length // BLOCK + 1)) for i in range(seqs)]
    backend = model.attention_backend
    positions, meta = build_flat_batch(backend, [length - 1] * seqs, [length - 1] * seqs, tables, BLOCK)
    model(ids[:, :-1].flatten(), positions, cache, meta)
    positions, meta = build_flat_batch(backend, [1] * seqs, [length] * seqs, tables, BLOCK)
    last = ids[:, -1].contiguous()
    return lambda: model(last, positions, cache, meta)


def hf_prefill(hf, ids: torch.Tensor) -> Callable[[], object]:
    return lambda: hf(ids, use_cache=False, logits_to_keep=1)


def hf_decode(hf, ids: torch.Tensor) -> Callable[[], object]:
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        hf(ids[:, :-1], cache=cache, use_cache=True)
    past = ids.shape[1] - 1

    def step() -> object:
        extra = cache.get_seq_length() - past
        if extra:
            cache.crop(-extra)
        return hf(ids[:, -1:], cache=cache, use_cache=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as directory:
        hf = save_checkpoint(BENCH_SHAPE, Path(directory), seed=0, perturb=False)
        ours = load_model(directory, dtype="float32", device="cpu")
    cache = allocate_kv_cache(4, 64 * 9, BLOCK, 4, 32, torch.float32, "cpu")
    prefill_ids = torch.randint(0, 32000, (16, 128))
    decode_ids = torch.randint(0, 32000, (64, 128))
    rows = []
    with torch.inference_mode():
        for name, ours_fn, hf_fn in (
            ("prefill 16 x 128", ours_prefill(ours, cache, prefill_ids), hf_prefill(hf, prefill_ids)),
            ("decode 64 x 1 @128", ours_decode(ours, cache, decode_ids), hf_decode(hf, decode_ids)),
        ):
            ours_s, hf_s = median_seconds(ours_fn, args.repeats), median_seconds(hf_fn, args.repeats)
            rows.append((name, ours_s, hf_s))
    print(f"{'workload':<22}{'ours ms':>10}{'transformers ms':>18}{'speed-up':>10}")
    for name, ours_s, hf_s in rows:
        print(f"{name:<22}{ours_s * 1e3:>10.1f}{hf_s * 1e3:>18.1f}{hf_s / ours_s:>9.2f}x")


if __name__ == "__main__":
    main()

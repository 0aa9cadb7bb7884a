"""GPU benchmark: our JetMoe (Triton paged attention, grouped expert matmul) against transformers' JetMoe.

``python -m benchmarks.gpu.bench_gpu`` on one H200 (a few minutes) builds a random-weight model with the real
JetMoe-8B shapes directly on the GPU in bf16 (nothing is written to disk) and reports, in one run:

- prefill tokens/s for 16 prompts x 512 tokens (one flat batch through our model; one padded-free batch
  through transformers' forward), as a fraction of the measured bf16 matmul rate (FLOPs / time / rate);
- decode output tokens/s at batch 1, 16, 64, 256 with 512-token contexts: our model with the Triton backend
  over a paged KV cache (and with the torch reference backend, for comparison), and transformers'
  ``generate`` (bf16, SDPA) where it fits; each as a fraction of the HBM roofline (bytes of weights touched per
  step, counted from the routers' real expert choices, plus KV bytes read, over 4.8 TB/s).

Decode rows: ``ours+graphs`` is what the engine serves on CUDA (each step's inputs loaded into static buffers,
then one CUDA graph replay; the host-side loading is timed too); ``ours+triton`` and ``ours+torch-ref`` run the
model eagerly with each step's metadata built before the timed loop. Times are CUDA events.

``--tiny`` runs the same code paths on CPU (Triton under its interpreter) with a 2-layer model and small
batches: a dry run that proves the script works, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.gpu.recorder import Recorder, Results
from model.config import JetMoeModelConfig
from model.jetmoe import JetMoeForCausalLM
from model.kernels import KernelChoice, select_kernels
from model.layers.attention import AttentionMetadata, allocate_kv_cache
from model.layers.routing import TopKRouter
from server.engine.worker.batch import build_flat_batch
from server.engine.worker.decode_graphs import DecodeGraphs
from tests.support.checkpoints import random_model, share_weights

HBM_BYTES_PER_S = 4.8e12  # H200 datasheet

JETMOE_8B = JetMoeModelConfig(
    vocab_size=32000,
    hidden_size=2048,
    num_layers=24,
    num_kv_heads=16,
    head_dim=128,
    intermediate_size=5632,
    num_experts=8,
    top_k=2,
    rms_norm_eps=1e-5,
)
TINY = JetMoeModelConfig(
    vocab_size=256,
    hidden_size=64,
    num_layers=2,
    num_kv_heads=4,
    head_dim=16,
    intermediate_size=96,
    num_experts=8,
    top_k=2,
    rms_norm_eps=1e-5,
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    config: JetMoeModelConfig
    prefill_seqs: int = 16
    prefill_len: int = 512
    decode_batches: tuple[int, ...] = (1, 16, 64, 256)
    context: int = 512
    decode_steps: int = 32
    warmup_steps: int = 3
    hf_new_tokens: tuple[int, int] = (8, 40)  # decode rate = B * (n2 - n1) / (t(n2) - t(n1))
    block_size: int = 16
    matmul_size: int = 8192


REAL_PLAN = Plan(JETMOE_8B)
TINY_PLAN = Plan(
    TINY,
    prefill_seqs=2,
    prefill_len=16,
    decode_batches=(1, 3),
    context=16,
    decode_steps=2,
    warmup_steps=1,
    hf_new_tokens=(2, 4),
    block_size=4,
    matmul_size=256,
)


# ----------------------------------------------------------------------------------------------- building


def build_hf_model(model: JetMoeForCausalLM):
    """transformers' JetMoe (SDPA) sharing our model's weight tensors: no extra weight memory."""
    from transformers import JetMoeConfig
    from transformers import JetMoeForCausalLM as HFJetMoe

    c = model.config
    hf_config = JetMoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_key_value_heads=c.num_kv_heads,
        kv_channels=c.head_dim,
        intermediate_size=c.intermediate_size,
        num_local_experts=c.num_experts,
        num_experts_per_tok=c.top_k,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf_config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = HFJetMoe(hf_config)
    result = hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch with transformers' JetMoe: {result}")
    hf.lm_head.weight = hf.model.embed_tokens.weight
    device = model.output_weight().device
    for module in hf.modules():
        if hasattr(module, "compute_default_rope_parameters") and hasattr(module, "inv_freq"):
            inv_freq, _ = module.compute_default_rope_parameters(hf_config)
            module.inv_freq = inv_freq.to(device)
            module.original_inv_freq = inv_freq.clone().to(device)
    leftover = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"transformers model still has meta tensors: {leftover}")
    return hf.eval()


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """Elapsed seconds of ``fn()``: CUDA events on a GPU, the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin


def measure_matmul_tflops(timer: Timer, device: torch.device, size: int) -> float:
    dtype = torch.bfloat16
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10
    seconds = timer(lambda: [a @ b for _ in range(reps)])
    return 2 * size**3 * reps / seconds / 1e12


def measure_copy_tb_per_s(timer: Timer, device: torch.device, size_bytes: int) -> float:
    src = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 5
    seconds = timer(lambda: [dst.copy_(src) for _ in range(reps)])
    return 2 * size_bytes * reps / seconds / 1e12  # bytes read + written


# -------------------------------------------------------------------------------------- roofline counting


def expert_param_bytes(model: JetMoeForCausalLM) -> dict[str, int]:
    """Bytes of one layer's shared weights and of one expert's attention and MLP weights."""
    layer = model.model.layers[0]
    attn, mlp = layer.self_attention, layer.mlp

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    experts = model.config.num_experts
    shared = sum(nbytes(p) for name, p in layer.named_parameters() if "input_linear" not in name)
    shared -= nbytes(attn.experts.output_linear.weight) + nbytes(mlp.output_linear.weight)
    return {
        "layer_shared": shared,
        "attn_expert": (nbytes(attn.experts.input_linear.weight) + nbytes(attn.experts.output_linear.weight))
        // experts,
        "mlp_expert": (nbytes(mlp.input_linear.weight) + nbytes(mlp.output_linear.weight)) // experts,
        "lm_head": nbytes(model.output_weight()),
        "final_norm": nbytes(model.model.norm.weight),
    }


def active_experts(model: JetMoeForCausalLM, run_step: Callable[[], object]) -> list[tuple[int, int]]:
    """Per layer, how many attention and MLP experts ``run_step`` routes at least one token to."""
    seen: dict[str, int] = {}

    def hook(name: str):
        def record(module, inputs, routing) -> None:
            seen[name] = int((routing.expert_counts.counts > 0).sum())

        return record

    handles = [
        module.register_forward_hook(hook(name))
        for name, module in model.named_modules()
        if isinstance(module, TopKRouter)
    ]
    try:
        run_step()
    finally:
        for handle in handles:
            handle.remove()
    return [
        (seen[f"model.layers.{i}.self_attention.experts.router"], seen[f"model.layers.{i}.mlp.router"])
        for i in range(model.config.num_layers)
    ]


def decode_step_bytes(
    model: JetMoeForCausalLM, active: list[tuple[int, int]], context_lens: Sequence[int]
) -> dict[str, int]:
    """HBM bytes one decode step must read at least: weights it touches and the KV cache it attends over."""
    c, sizes = model.config, expert_param_bytes(model)
    weights = sizes["lm_head"] + sizes["final_norm"]
    for attn_active, mlp_active in active:
        weights += (
            sizes["layer_shared"] + attn_active * sizes["attn_expert"] + mlp_active * sizes["mlp_expert"]
        )
    element = model.output_weight().element_size()
    kv = sum(context_lens) * c.num_layers * 2 * c.num_kv_heads * c.head_dim * element
    return {"weights": weights, "kv": kv}


def prefill_flops(config: JetMoeModelConfig, seqs: int, length: int) -> float:
    """Matmul FLOPs of a prefill of ``seqs`` prompts of ``length`` tokens (causal attention, last-token logits)."""
    d, kv, f, k = config.hidden_size, config.kv_size, config.intermediate_size, config.top_k
    per_token_layer = 2 * (
        d * 2 * kv  # kv_proj
        + 2 * d * config.num_experts  # two routers
        + k * (d * kv + kv * d)  # attention experts: query and output projections
        + k * (d * 2 * f + f * d)  # MLP experts
    )
    pairs = length * (length + 1) / 2  # causal query-key pairs per head
    attention_layer = 2 * 2 * pairs * config.head_dim * config.num_query_heads  # QK^T and PV
    per_seq = config.num_layers * (length * per_token_layer + attention_layer) + 2 * d * config.vocab_size
    return seqs * per_seq


# ------------------------------------------------------------------------------------------- benchmarks


def shuffled_tables(num_seqs: int, tokens: int, block_size: int, seed: int) -> tuple[list[list[int]], int]:
    per_seq = math.ceil(tokens / block_size)
    pool = list(range(num_seqs * per_seq))
    random.Random(seed).shuffle(pool)
    return [pool[i * per_seq : (i + 1) * per_seq] for i in range(num_seqs)], num_seqs * per_seq


def new_caches(model: JetMoeForCausalLM, num_blocks: int, block_size: int, fill: bool) -> list[torch.Tensor]:
    c, weight = model.config, model.output_weight()
    caches = allocate_kv_cache(
        c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, weight.dtype, weight.device
    )
    if fill:  # stands in for the prompts' K/V: attention cost does not depend on the values
        for cache in caches:
            cache.normal_(0.0, 1.0)
    return caches


def bench_prefill(model, plan: Plan, timer: Timer) -> dict:
    c, device = model.config, model.output_weight().device
    seqs, length = plan.prefill_seqs, plan.prefill_len
    tables, num_blocks = shuffled_tables(seqs, length, plan.block_size, seed=1)
    caches = new_caches(model, num_blocks, plan.block_size, fill=False)
    positions, meta = build_flat_batch(
        model.attention_backend, [length] * seqs, [length] * seqs, tables, plan.block_size, device=device
    )
    ids = torch.randint(0, c.vocab_size, (seqs * length,), device=device)
    model(ids, positions, caches, meta)  # warm-up (Triton compile, cuBLAS heuristics)
    reps = 3
    seconds = timer(lambda: [model(ids, positions, caches, meta) for _ in range(reps)]) / reps
    return {"seconds": seconds, "tokens_per_s": seqs * length / seconds}


def bench_hf_prefill(hf, plan: Plan, timer: Timer) -> dict:
    device = hf.lm_head.weight.device
    ids = torch.randint(0, hf.config.vocab_size, (plan.prefill_seqs, plan.prefill_len), device=device)
    with torch.no_grad():
        hf(ids, use_cache=False, logits_to_keep=1)
        reps = 3
        seconds = timer(lambda: [hf(ids, use_cache=False, logits_to_keep=1) for _ in range(reps)]) / reps
    return {"seconds": seconds, "tokens_per_s": plan.prefill_seqs * plan.prefill_len / seconds}


def decode_metas(
    model: JetMoeForCausalLM, plan: Plan, batch: int, device: torch.device
) -> tuple[list[tuple[torch.Tensor, AttentionMetadata]], int]:
    steps = plan.warmup_steps + plan.decode_steps + 1
    tables, num_blocks = shuffled_tables(batch, plan.context + steps, plan.block_size, seed=batch)
    metas = [
        build_flat_batch(
            model.attention_backend, [1] * batch, [plan.context + 1 + i] * batch, tables, plan.block_size,
            device=device,
        )
        for i in range(steps)
    ]
    return metas, num_blocks


def bench_decode(model, plan: Plan, batch: int, timer: Timer) -> dict:
    """Greedy decode steps on ``batch`` sequences whose first ``plan.context`` tokens are in the paged cache."""
    device = model.output_weight().device
    metas, num_blocks = decode_metas(model, plan, batch, device)
    caches = new_caches(model, num_blocks, plan.block_size, fill=True)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)

    def step(i: int) -> None:
        nonlocal ids
        positions, meta = metas[i]
        ids = model(ids, positions, caches, meta).argmax(-1)

    for i in range(plan.warmup_steps):
        step(i)
    first = plan.warmup_steps
    seconds = timer(lambda: [step(i) for i in range(first, first + plan.decode_steps)])
    active = active_experts(model, lambda: step(first + plan.decode_steps))
    return decode_row(model, plan, batch, seconds / plan.decode_steps, active)


def bench_graph_decode(model, plan: Plan, batch: int, timer: Timer) -> dict:
    """The same decode steps as the engine serves them on CUDA: padded static inputs, one CUDA graph replay.

    Each timed step includes the host-side work of loading the step's token ids, positions, slots and block
    tables into the graph's buffers; token ids are drawn in advance (routing differs per step, as in serving).
    """
    device = model.output_weight().device
    steps = plan.warmup_steps + plan.decode_steps + 1
    tables, num_blocks = shuffled_tables(batch, plan.context + steps, plan.block_size, seed=batch)
    caches = new_caches(model, num_blocks + 1, plan.block_size, fill=True)  # + the padding block
    graphs = DecodeGraphs(
        model, caches, (batch,), len(tables[0]), plan.block_size, num_blocks, capture=device.type == "cuda"
    )
    gen = torch.Generator().manual_seed(batch)
    ids = [torch.randint(3, model.config.vocab_size, (batch,), generator=gen).tolist() for _ in range(steps)]

    def step(i: int) -> None:
        graphs.run(ids[i], [plan.context + 1 + i] * batch, tables)

    for i in range(plan.warmup_steps):
        step(i)
    first = plan.warmup_steps
    seconds = timer(lambda: [step(i) for i in range(first, first + plan.decode_steps)])
    last = first + plan.decode_steps
    positions, meta = build_flat_batch(
        model.attention_backend, [1] * batch, [plan.context + 1 + last] * batch, tables, plan.block_size,
        device=device,
    )
    eager_step = lambda: model(torch.tensor(ids[last], device=device), positions, caches, meta)  # noqa: E731
    return decode_row(model, plan, batch, seconds / plan.decode_steps, active_experts(model, eager_step))


def decode_row(model, plan: Plan, batch: int, per_step: float, active: list[tuple[int, int]]) -> dict:
    """One decode measurement with its bytes moved and roofline fraction."""
    contexts = [plan.context + 1 + plan.warmup_steps + plan.decode_steps // 2] * batch  # mid-run context
    nbytes = decode_step_bytes(model, active, contexts)
    roofline = (nbytes["weights"] + nbytes["kv"]) / HBM_BYTES_PER_S
    return {
        "batch": batch,
        "step_ms": per_step * 1e3,
        "tokens_per_s": batch / per_step,
        "weight_gb_per_step": nbytes["weights"] / 1e9,
        "kv_gb_per_step": nbytes["kv"] / 1e9,
        "achieved_tb_per_s": (nbytes["weights"] + nbytes["kv"]) / per_step / 1e12,
        "roofline_fraction": roofline / per_step,
        "mean_active_experts": [
            sum(a for a, _ in active) / len(active),
            sum(m for _, m in active) / len(active),
        ],
    }


def bench_hf_decode(hf, plan: Plan, batch: int, timer: Timer) -> dict:
    device = hf.lm_head.weight.device
    ids = torch.randint(3, hf.config.vocab_size, (batch, plan.context), device=device)
    n1, n2 = plan.hf_new_tokens

    def generate(n: int) -> None:
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.no_grad():
        generate(n1)  # warm-up
        t1 = timer(lambda: generate(n1))
        t2 = timer(lambda: generate(n2))
    per_step = (t2 - t1) / (n2 - n1)
    return {"batch": batch, "step_ms": per_step * 1e3, "tokens_per_s": batch / per_step}


# ------------------------------------------------------------------------------------------------- report


def report(results: Results, plan: Plan) -> str:
    lines = [
        f"device: {results.device}",
        f"shapes: {results.shapes}",
        f"measured bf16 matmul: {results.matmul_tflops:.0f} TFLOP/s "
        f"({plan.matmul_size}^3); device copy: {results.copy_tb_per_s:.2f} TB/s (read + write); "
        f"HBM roofline used: {HBM_BYTES_PER_S / 1e12:.1f} TB/s",
        "",
        f"prefill, {plan.prefill_seqs} x {plan.prefill_len} tokens "
        f"({results.prefill.get('gflop', 0):.0f} GFLOP):",
    ]
    for who, row in results.prefill.items():
        if isinstance(row, dict):
            lines.append(
                f"  {who:<14} {row['tokens_per_s']:>11,.0f} tok/s  {row['seconds'] * 1e3:8.1f} ms  "
                f"{row['fraction']:6.1%} of the measured matmul rate"
            )
    lines += ["", f"decode, {plan.context}-token contexts, {plan.decode_steps} timed steps:"]
    lines.append(
        f"  {'who':<14} {'batch':>5} {'tok/s':>11} {'ms/step':>8} {'weights GB':>10} {'KV GB':>7} "
        f"{'TB/s':>6} {'roofline':>8}"
    )
    lines += [decode_line(row) for row in results.decode]
    served = {r["batch"]: r for r in results.decode if r["who"] == "ours+graphs"}
    baseline = {r["batch"]: r for r in results.decode if r["who"] == "transformers"}
    ratios = [
        f"b={b}: {served[b]['tokens_per_s'] / baseline[b]['tokens_per_s']:.1f}x"
        for b in sorted(served)
        if b in baseline
    ]
    if ratios:
        lines += ["", "ours+graphs over transformers generate: " + ", ".join(ratios)]
    if results.notes:
        lines += ["", "notes:"] + [f"  {note}" for note in results.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="dry run: 2-layer model on CPU, tiny batches")
    parser.add_argument("--batches", default=None, help="decode batch sizes, e.g. 1,16,64,256")
    parser.add_argument(
        "--hf-batches", default=None, help="decode batch sizes for transformers (default: same)"
    )
    parser.add_argument("--skip-hf", action="store_true", help="do not run transformers' JetMoe")
    parser.add_argument("--skip-torch-ref", action="store_true", help="no decode run with the torch backend")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args(argv)


def setup_device(tiny: bool) -> torch.device:
    """CUDA for the real run; CPU with the Triton interpreter for ``--tiny`` without a GPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not tiny:
        sys.exit("no CUDA device: the full benchmark needs a GPU (use --tiny for a CPU dry run)")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before model.kernels.triton_attention is imported
    return torch.device("cpu")


def decode_line(row: dict) -> str:
    return (
        f"  {row['who']:<14} {row['batch']:>5} {row['tokens_per_s']:>11,.0f} {row['step_ms']:>8.2f} "
        f"{row.get('weight_gb_per_step', float('nan')):>10.2f} {row.get('kv_gb_per_step', float('nan')):>7.2f} "
        f"{row.get('achieved_tb_per_s', float('nan')):>6.2f} {row.get('roofline_fraction', float('nan')):>8.1%}"
    )


def record_decode(rec: Recorder, who: str, batch: int, fn: Callable[[], dict]) -> None:
    row = rec.section(f"decode {who} b={batch}", fn)
    if row:
        rec.results.decode.append({"who": who, **row})
        print(decode_line(rec.results.decode[-1]), flush=True)
        rec.save()


def record_prefill(rec: Recorder, who: str, flops: float, fn: Callable[[], dict]) -> None:
    row = rec.section(f"prefill {who}", fn)
    if row:
        rate = rec.results.matmul_tflops * 1e12
        rec.results.prefill[who] = {**row, "fraction": flops / row["seconds"] / rate if rate else float("nan")}
        print(f"  {who}: {row['tokens_per_s']:,.0f} tok/s, {row['seconds'] * 1e3:.1f} ms", flush=True)
        rec.save()


def with_roofline(row: dict, ours: dict | None) -> dict:
    """A transformers decode row with our byte counts at the same batch (the same bytes to move per step)."""
    if ours is None:
        return row
    moved = (ours["weight_gb_per_step"] + ours["kv_gb_per_step"]) * 1e9
    seconds = row["step_ms"] / 1e3
    return {**row, "weight_gb_per_step": ours["weight_gb_per_step"], "kv_gb_per_step": ours["kv_gb_per_step"],
            "achieved_tb_per_s": moved / seconds / 1e12, "roofline_fraction": moved / HBM_BYTES_PER_S / seconds}


def run_ours(rec: Recorder, model, plan: Plan, timer: Timer, args: argparse.Namespace) -> None:
    device = model.output_weight().device
    reference = rec.section("build the torch-reference variant", lambda: share_weights(
        model, select_kernels(device, KernelChoice(attention="torch"), torch.bfloat16, plan.config)))
    flops = prefill_flops(plan.config, plan.prefill_seqs, plan.prefill_len)
    rec.results.prefill["gflop"] = flops / 1e9
    record_prefill(rec, "ours", flops, lambda: bench_prefill(model, plan, timer))
    for batch in plan.decode_batches:
        record_decode(rec, "ours+graphs", batch, lambda b=batch: bench_graph_decode(model, plan, b, timer))
        record_decode(rec, "ours+triton", batch, lambda b=batch: bench_decode(model, plan, b, timer))
        if not args.skip_torch_ref and reference is not None:
            record_decode(rec, "ours+torch-ref", batch, lambda b=batch: bench_decode(reference, plan, b, timer))


def run_transformers(rec: Recorder, model, plan: Plan, timer: Timer, hf_batches: Sequence[int]) -> None:
    hf = rec.section("build transformers' JetMoe (shares our weights)", lambda: build_hf_model(model))
    if hf is None:
        return
    flops = prefill_flops(plan.config, plan.prefill_seqs, plan.prefill_len)
    record_prefill(rec, "transformers", flops, lambda: bench_hf_prefill(hf, plan, timer))
    ours_by_batch = {r["batch"]: r for r in rec.results.decode if r["who"] == "ours+graphs"}
    for batch in hf_batches:
        record_decode(rec, "transformers", batch,
                      lambda b=batch: with_roofline(bench_hf_decode(hf, plan, b, timer), ours_by_batch.get(b)))


def main(argv: Sequence[str] | None = None) -> Results:
    args = parse_args(argv)
    plan = TINY_PLAN if args.tiny else REAL_PLAN
    if args.batches:
        plan = Plan(**{**asdict(plan), "config": plan.config, "decode_batches": _ints(args.batches)})
    hf_batches = _ints(args.hf_batches) if args.hf_batches else plan.decode_batches
    device = setup_device(args.tiny)
    torch.manual_seed(0)
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    rec = Recorder(Results(device=name, shapes=asdict(plan.config)), args.json)
    print(f"device {name}", flush=True)
    matmul = rec.section("bf16 matmul rate", lambda: measure_matmul_tflops(timer, device, plan.matmul_size))
    rec.results.matmul_tflops = matmul or 0.0
    copy = rec.section("device copy rate", lambda: measure_copy_tb_per_s(
        timer, device, 1 << (32 if device.type == "cuda" else 24)))
    rec.results.copy_tb_per_s = copy or 0.0
    print(f"  {rec.results.matmul_tflops:.0f} TFLOP/s bf16 matmul, {rec.results.copy_tb_per_s:.2f} TB/s copy")
    # As served: "auto" kernels on CUDA; the Triton attention (interpreted) for the CPU dry run.
    choice = KernelChoice() if device.type == "cuda" else KernelChoice(attention="triton")
    model = rec.section("build the model", lambda: random_model(
        plan.config, device, torch.bfloat16, select_kernels(device, choice, torch.bfloat16, plan.config)))
    if model is not None:
        run_ours(rec, model, plan, timer, args)
        if not args.skip_hf:
            run_transformers(rec, model, plan, timer, hf_batches)
    print("\n" + report(rec.results, plan), flush=True)
    rec.save()
    return rec.results


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


if __name__ == "__main__":
    main()

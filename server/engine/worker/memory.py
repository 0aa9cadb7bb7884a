"""Sizing the KV cache: on CUDA from ``gpu_memory_utilization`` after the weights and a profiled activation peak.

The rule (vLLM's): of the device's total memory, the engine may use ``gpu_memory_utilization``. What is in use
once the weights are loaded (weights, the CUDA context, other processes) counts against it, and so does the
activation peak of the largest steps the scheduler can build, measured by running them once on dummy inputs
(``profile_activation_peak``): a step of fresh prompts filling the token budget, and a chunk of a long prompt
continuing after cached tokens (its attention scores span the whole context). Memory allocated after the
profile is reserved explicitly: the CUDA-graph pool (the decode step at the largest graph batch, profiled too)
and ``WORKSPACE_RESERVE`` for library workspaces and modules (cuBLAS/cuBLASLt, Triton kernels loaded later) and
allocator fragmentation. The rest is KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.jetmoe import JetMoeForCausalLM
from model.layers.attention import allocate_kv_cache
from server.engine.worker.batch import build_flat_batch

GIB = float(1 << 30)
WORKSPACE_RESERVE = 512 << 20  # cuBLAS/cuBLASLt workspaces, later-loaded kernel modules, fragmentation


@dataclass(frozen=True)
class ProfileStep:
    """The shape of one profiled step: per sequence its new tokens and its context (cached + new)."""

    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    all_logits: bool = True


@dataclass(frozen=True)
class MemoryPlan:
    """How the device's memory is split; all in bytes."""

    total: int
    utilization: float
    in_use: int  # after loading: weights, CUDA context, other processes
    weights: int
    activation_peak: int
    kv_cache: int
    reserved: int = 0  # CUDA-graph pool and library workspaces, allocated after the profile

    def describe(self) -> str:
        return (
            f"{self.kv_cache / GIB:.2f} GiB for the KV cache = {self.utilization:.0%} of {self.total / GIB:.1f} GiB "
            f"- {self.in_use / GIB:.2f} GiB in use after loading (weights {self.weights / GIB:.2f} GiB) "
            f"- {self.activation_peak / GIB:.2f} GiB activation peak "
            f"- {self.reserved / GIB:.2f} GiB reserved for graphs and workspaces"
        )


def plan_kv_cache_memory(
    total: int, free: int, weights: int, activation_peak: int, utilization: float, reserved: int = 0
) -> MemoryPlan:
    """The KV cache budget: ``utilization * total`` minus what is in use (``total - free``), the peak and the
    ``reserved`` bytes."""
    in_use = total - free
    kv_cache = int(total * utilization) - in_use - activation_peak - reserved
    if kv_cache <= 0:
        raise ValueError(
            f"no memory is left for the KV cache: {utilization:.0%} of {total / GIB:.1f} GiB is "
            f"{total * utilization / GIB:.2f} GiB, but {in_use / GIB:.2f} GiB are in use after loading, the "
            f"largest step needs {activation_peak / GIB:.2f} GiB more and {reserved / GIB:.2f} GiB are reserved "
            "for graphs and workspaces; raise --gpu-memory-utilization or lower --max-num-batched-tokens"
        )
    return MemoryPlan(total, utilization, in_use, weights, activation_peak, kv_cache, reserved)


def profile_batch(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the largest step: ``max_num_batched_tokens`` tokens in prompts of at most
    ``max_model_len``."""
    full, rest = divmod(max_num_batched_tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def profile_steps(max_num_batched_tokens: int, max_model_len: int) -> list[ProfileStep]:
    """The steps whose peak bounds every step: fresh prompts filling the budget (logits at every token), and
    the longest chunk that can continue a cached prompt of ``max_model_len`` tokens (scores over it all)."""
    lengths = tuple(profile_batch(max_num_batched_tokens, max_model_len))
    steps = [ProfileStep(lengths, lengths)]
    chunk = min(max_num_batched_tokens, max_model_len - 1)
    if chunk > 1:
        steps.append(ProfileStep((chunk,), (max_model_len,), all_logits=False))
    return steps


def decode_step(batch: int, block_size: int) -> ProfileStep:
    """A decode step of ``batch`` sequences (what the largest CUDA graph holds; contexts of one block)."""
    return ProfileStep((1,) * batch, (block_size,) * batch, all_logits=False)


def profile_step_peak(model: JetMoeForCausalLM, step: ProfileStep, block_size: int) -> int:
    """Peak bytes allocated on the model's CUDA device while running ``step`` once on dummy inputs, followed by
    the log-softmax of its logits. Its scratch KV cache is allocated before the measurement, so not counted."""
    weight = model.output_weight()
    device, config = weight.device, model.config
    per_seq = [-(-n // block_size) for n in step.context_lens]
    starts = [sum(per_seq[:i]) for i in range(len(per_seq))]
    tables = [list(range(start, start + n)) for start, n in zip(starts, per_seq)]
    caches = allocate_kv_cache(
        config.num_layers, sum(per_seq), block_size, config.num_kv_heads, config.head_dim, weight.dtype, device
    )
    positions, meta = build_flat_batch(
        model.attention_backend, list(step.query_lens), list(step.context_lens), tables, block_size,
        device=device, all_logits=step.all_logits,
    )  # fmt: skip
    ids = torch.zeros(sum(step.query_lens), dtype=torch.long, device=device)  # [T]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    logits = model(ids, positions, caches, meta)  # [N, V]
    torch.log_softmax(logits.float(), dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches, logits
    torch.cuda.empty_cache()
    return peak


def profile_activation_peak(
    model: JetMoeForCausalLM, max_num_batched_tokens: int, max_model_len: int, block_size: int
) -> int:
    """The largest peak of the ``profile_steps`` (bytes on the model's CUDA device)."""
    steps = profile_steps(max_num_batched_tokens, max_model_len)
    return max(profile_step_peak(model, step, block_size) for step in steps)


def plan_for_device(
    model: JetMoeForCausalLM,
    max_num_batched_tokens: int,
    max_model_len: int,
    block_size: int,
    utilization: float,
    graph_batch: int = 0,
) -> MemoryPlan:
    """Profile the model on its CUDA device and split that device's memory; ``graph_batch`` > 0 reserves the
    pool of decode graphs captured up to that batch."""
    device = model.output_weight().device
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = profile_activation_peak(model, max_num_batched_tokens, max_model_len, block_size)
    graph_pool = profile_step_peak(model, decode_step(graph_batch, block_size), block_size) if graph_batch else 0
    free, total = torch.cuda.mem_get_info(device)
    return plan_kv_cache_memory(total, free, weights, peak, utilization, reserved=graph_pool + WORKSPACE_RESERVE)

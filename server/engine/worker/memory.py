"""Sizing the KV cache: on CUDA from ``gpu_memory_utilization`` after the weights and a profiled activation peak.

The rule (vLLM's): of the device's total memory, the engine may use ``gpu_memory_utilization``. What is in use
once the weights are loaded (weights, the CUDA context, other processes) counts against it, and so does the
activation peak of the largest step the scheduler can build, measured by running that step once on dummy
inputs (``profile_activation_peak``). The rest is KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.jetmoe import JetMoeForCausalLM
from model.layers.attention import allocate_kv_cache
from server.engine.worker.batch import build_flat_batch

GIB = float(1 << 30)


@dataclass(frozen=True)
class MemoryPlan:
    """How the device's memory is split; all in bytes."""

    total: int
    utilization: float
    in_use: int  # after loading: weights, CUDA context, other processes
    weights: int
    activation_peak: int
    kv_cache: int

    def describe(self) -> str:
        return (
            f"{self.kv_cache / GIB:.2f} GiB for the KV cache = {self.utilization:.0%} of {self.total / GIB:.1f} GiB "
            f"- {self.in_use / GIB:.2f} GiB in use after loading (weights {self.weights / GIB:.2f} GiB) "
            f"- {self.activation_peak / GIB:.2f} GiB activation peak"
        )


def plan_kv_cache_memory(
    total: int, free: int, weights: int, activation_peak: int, utilization: float
) -> MemoryPlan:
    """The KV cache budget: ``utilization * total`` minus what is in use (``total - free``) and the peak."""
    in_use = total - free
    kv_cache = int(total * utilization) - in_use - activation_peak
    if kv_cache <= 0:
        raise ValueError(
            f"no memory is left for the KV cache: {utilization:.0%} of {total / GIB:.1f} GiB is "
            f"{total * utilization / GIB:.2f} GiB, but {in_use / GIB:.2f} GiB are in use after loading and the "
            f"largest step needs {activation_peak / GIB:.2f} GiB more; raise --gpu-memory-utilization or lower "
            "--max-num-batched-tokens"
        )
    return MemoryPlan(total, utilization, in_use, weights, activation_peak, kv_cache)


def profile_batch(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """Prompt lengths of the largest step: ``max_num_batched_tokens`` tokens in prompts of at most
    ``max_model_len``."""
    full, rest = divmod(max_num_batched_tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def profile_activation_peak(
    model: JetMoeForCausalLM, max_num_batched_tokens: int, max_model_len: int, block_size: int
) -> int:
    """Peak bytes allocated on the model's CUDA device while running the largest step once.

    The step is a prefill of ``max_num_batched_tokens`` dummy tokens with logits at every token (what a prompt
    with ``logprobs`` asks for), followed by the log-softmax of those logits. Its scratch KV cache is
    allocated before the measurement starts, so it is not counted.
    """
    weight = model.output_weight()
    device, config = weight.device, model.config
    lengths = profile_batch(max_num_batched_tokens, max_model_len)
    per_seq = [-(-n // block_size) for n in lengths]
    starts = [sum(per_seq[:i]) for i in range(len(per_seq))]
    tables = [list(range(start, start + n)) for start, n in zip(starts, per_seq)]
    caches = allocate_kv_cache(
        config.num_layers, sum(per_seq), block_size, config.num_kv_heads, config.head_dim, weight.dtype, device
    )
    positions, meta = build_flat_batch(
        model.attention_backend, lengths, lengths, tables, block_size, device=device, all_logits=True
    )
    ids = torch.zeros(sum(lengths), dtype=torch.long, device=device)  # [T]
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    logits = model(ids, positions, caches, meta)  # [T, V]
    torch.log_softmax(logits.float(), dim=-1)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches, logits
    torch.cuda.empty_cache()
    return peak


def plan_for_device(
    model: JetMoeForCausalLM,
    max_num_batched_tokens: int,
    max_model_len: int,
    block_size: int,
    utilization: float,
) -> MemoryPlan:
    """Profile the model on its CUDA device and split that device's memory."""
    device = model.output_weight().device
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = profile_activation_peak(model, max_num_batched_tokens, max_model_len, block_size)
    free, total = torch.cuda.mem_get_info(device)
    return plan_kv_cache_memory(total, free, weights, peak, utilization)

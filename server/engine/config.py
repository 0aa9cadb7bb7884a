"""Engine settings, in one frozen place."""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.spec.config import SpeculativeConfig

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30
# Token budget per step when none is set. On CPU a step's cost grows with its tokens: a small budget chunks long
# prompts so that running streams keep moving (README, "Latency": p99 inter-token latency while 1,500-token
# prompts arrive is 10x its p50 alone at 2048, 3.7x at 256).
DEFAULT_CUDA_TOKEN_BUDGET = 2048
DEFAULT_CPU_TOKEN_BUDGET = 256


@dataclass(frozen=True)
class EngineConfig:
    """How the engine loads the model and sizes its batches and KV cache.

    KV cache size: ``num_kv_blocks`` when set; otherwise ``kv_cache_memory`` bytes (default 1 GiB on CPU); on
    CUDA by default what is left of ``gpu_memory_utilization`` of the device's total memory after the weights
    and the profiled activation peak of the largest step (``server.engine.memory``).
    ``enforce_eager`` turns off the CUDA graphs that decode steps replay on CUDA.
    ``kv_events_endpoint``: a ZeroMQ endpoint to publish KV-cache events on (``server.engine.kv_events``),
    under ``kv_events_topic``.
    ``speculative_config``: propose tokens by n-gram lookup and verify them in one forward
    (``server.engine.spec``); None runs without speculation.
    ``max_num_batched_tokens``: the token budget of one step; None: 2048 on CUDA, 256 on CPU (``token_budget``).
    """

    model: str
    device: str = "auto"
    dtype: str | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # "auto": Triton kernels on CUDA, the PyTorch reference elsewhere
    enforce_eager: bool = False
    kv_events_endpoint: str | None = None
    kv_events_topic: str = ""
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens or 1,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")

    def token_budget(self, device_type: str) -> int:
        """``max_num_batched_tokens``, or the default of the device the model runs on."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return DEFAULT_CUDA_TOKEN_BUDGET if device_type == "cuda" else DEFAULT_CPU_TOKEN_BUDGET

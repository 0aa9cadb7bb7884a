"""What one benchmark run does: ``BenchmarkConfig``, plus the helpers that read its fields from text."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Endpoint = Literal["completions", "chat"]
DatasetName = Literal["random", "sharegpt", "jsonl"]

ENDPOINT_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchError(Exception):
    """A problem the user can fix (bad flags, unreachable server, missing file or package): one line."""


@dataclass
class BenchmarkConfig:
    """Everything one run needs; ``request_rate`` is one rate (the CLI loops over several)."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: Endpoint = "completions"
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    dataset_name: DatasetName = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_vocab_size: int = 1000
    sharegpt_output_len: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    metric_percentiles: list[float] = field(default_factory=lambda: [99.0])
    request_timeout: float = 3600.0
    disable_tqdm: bool = False

    @property
    def root_url(self) -> str:
        """``base_url`` without a trailing ``/`` or ``/v1``: both spellings of the server's address work."""
        url = self.base_url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url

    @property
    def url(self) -> str:
        """The full URL that requests are posted to."""
        return self.root_url + ENDPOINT_PATHS[self.endpoint]

    def validate(self) -> None:
        """Raise ``BenchError`` on values no run can use."""
        checks = [
            (self.endpoint in ENDPOINT_PATHS, f"unknown endpoint {self.endpoint!r}: completions or chat"),
            (self.num_prompts >= 1, "--num-prompts must be at least 1"),
            (self.random_input_len >= 1 and self.random_output_len >= 1,
             "--random-input-len and --random-output-len must be at least 1"),
            (0.0 <= self.random_range_ratio < 1.0, "--random-range-ratio must be in [0, 1)"),
            (self.random_vocab_size >= 1, "--random-vocab-size must be at least 1"),
            (self.request_rate > 0, "--request-rate must be positive (or inf)"),
            (self.burstiness > 0, "--burstiness must be positive"),
            (self.max_concurrency is None or self.max_concurrency >= 1, "--max-concurrency must be at least 1"),
            (all(0 < p <= 100 for p in self.metric_percentiles), "--metric-percentiles must be in (0, 100]"),
            (self.dataset_name == "random" or self.dataset_path is not None,
             f"--dataset-name {self.dataset_name} needs --dataset-path"),
        ]
        for ok, message in checks:
            if not ok:
                raise BenchError(message)


def parse_rates(text: str) -> list[float]:
    """``"1,2,4,inf"`` -> ``[1.0, 2.0, 4.0, inf]`` (requests per second; inf sends all at once)."""
    rates = []
    for part in text.split(","):
        try:
            rate = float(part.strip())
        except ValueError:
            raise BenchError(f"bad request rate {part!r}: a number of requests/s or inf") from None
        if not rate > 0:
            raise BenchError(f"bad request rate {part!r}: it must be positive")
        rates.append(rate)
    return rates


def parse_percentiles(text: str) -> list[float]:
    """``"50,90,99"`` -> ``[50.0, 90.0, 99.0]``."""
    try:
        return [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise BenchError(f"bad --metric-percentiles {text!r}: comma-separated numbers") from None


def rate_label(rate: float) -> str:
    """How a rate is written in tables, plots and JSON: ``"inf"`` or ``"2"`` / ``"0.5"``."""
    return "inf" if math.isinf(rate) else f"{rate:g}"


def percentile_label(p: float) -> str:
    """``99.0`` -> ``"p99"``, ``99.9`` -> ``"p99.9"`` (vLLM's field names)."""
    return f"p{p:g}"

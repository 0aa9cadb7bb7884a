"""Speculative decoding's counters on ``/metrics``: vLLM's names under ``vllm:`` and ``jetmoe:``, read from the
engine's stats at scrape time, from which the acceptance rate and mean accepted length follow."""

from __future__ import annotations

from server.api.metrics import ServerMetrics
from server.engine.core import EngineStats
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams
from server.engine.spec import SpeculativeConfig
from server.engine.spec.decoder import SpecDecoder
from tests.support.prom import sample


class StatsOnly:
    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def stats(self) -> EngineStats:
        return self._stats


def spec_stats() -> EngineStats:
    """The stats of a decoder that verified two proposals: 4 tokens of which 3 were kept, 2 of which 0."""
    decoder = SpecDecoder(SpeculativeConfig(4), max_model_len=100, vocab_size=50)
    request = Request("r", 0, [1, 2, 3], SamplingParams())
    decoder.record(request, 4, 3)
    decoder.record(request, 2, 0)
    counters = decoder.counters
    return EngineStats(1, 0, 0.1, 0, 0, 0, spec_decode_num_drafts=counters.drafts,
                       spec_decode_num_draft_tokens=counters.draft_tokens,
                       spec_decode_num_accepted_tokens=counters.accepted_tokens)


def test_spec_decode_counters_under_both_prefixes() -> None:
    metrics = ServerMetrics(StatsOnly(spec_stats()), "tiny", vllm_names=True)  # type: ignore[arg-type]
    text = metrics.render().decode()
    for prefix in ("vllm:", "jetmoe:"):
        drafts = sample(text, f"{prefix}spec_decode_num_drafts_total", model_name="tiny")
        proposed = sample(text, f"{prefix}spec_decode_num_draft_tokens_total", model_name="tiny")
        accepted = sample(text, f"{prefix}spec_decode_num_accepted_tokens_total", model_name="tiny")
        assert (drafts, proposed, accepted) == (2, 6, 3)
        assert accepted / proposed == 0.5 and 1 + accepted / drafts == 2.5  # acceptance rate, mean length
    assert "# TYPE vllm:spec_decode_num_drafts_total counter" in text


def test_without_speculation_the_counters_stay_zero() -> None:
    text = ServerMetrics(StatsOnly(EngineStats(0, 0, 0.0, 0, 0, 0)), "tiny").render().decode()  # type: ignore[arg-type]
    assert "jetmoe:spec_decode_num_drafts_total" in text
    assert sample(text, "jetmoe:spec_decode_num_accepted_tokens_total") == 0.0
    assert "vllm:" not in text

"""``/metrics`` as LLM-aware routers read it: vLLM's names and labels (``--export-vllm-metrics``), a
``model_name`` label on every series, and ``cache_config_info``; parsed with prometheus_client's parser."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.api import ServerSettings
from tests.support.live_server import SERVED_NAME, live_server
from tests.support.prom import sample, samples

# What llm-d's endpoint picker, KServe and vLLM's production-stack router scrape.
ROUTER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc")
ROUTER_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                   "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
ROUTER_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                     "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds")


@pytest.fixture(scope="module")
def router_server(engine_checkpoint):
    settings = ServerSettings(served_model_name=SERVED_NAME, export_vllm_metrics=True)
    with live_server(engine_checkpoint[0], settings) as server:
        yield server


def test_every_series_has_the_model_name_label(router_server) -> None:
    text = httpx.get(f"{router_server.url}/metrics").text
    found = samples(text)
    ours = {name: labels for name, labels in found.items() if name.startswith(("jetmoe:", "vllm:"))}
    assert len(ours) > 30
    for name, label_sets in ours.items():
        assert all(labels.get("model_name") == SERVED_NAME for labels in label_sets), name


def test_vllm_names_are_exported_and_cache_config_is_an_info_metric(router_server) -> None:
    found = samples(httpx.get(f"{router_server.url}/metrics").text)
    for name in ROUTER_GAUGES + ROUTER_COUNTERS:
        assert name in found, name
    for name in ROUTER_HISTOGRAMS:
        assert f"{name}_bucket" in found and f"{name}_count" in found, name
    engine = router_server.engine
    for prefix in ("jetmoe:", "vllm:"):
        (info,) = found[f"{prefix}cache_config_info"]
        assert info["block_size"] == str(engine.config.block_size)
        assert info["num_gpu_blocks"] == str(engine.num_kv_blocks)


def test_the_router_metrics_move_as_the_engine_works(router_server) -> None:
    url = router_server.url
    before = httpx.get(f"{url}/metrics").text
    prompt = "The quick brown fox jumps over the lazy dog. " * 4
    body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": 120, "ignore_eos": True, "stream": True}
    seen_running = threading.Event()

    def watch() -> None:
        for _ in range(200):
            text = httpx.get(f"{url}/metrics").text
            if sample(text, "vllm:num_requests_running") >= 1 and sample(text, "vllm:kv_cache_usage_perc") > 0:
                seen_running.set()
                return

    watcher = threading.Thread(target=watch)
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)  # the stream has started: the request is running now
        watcher.start()
        list(lines)
    watcher.join(30)
    httpx.post(f"{url}/v1/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=60)
    after = httpx.get(f"{url}/metrics").text
    assert seen_running.is_set(), "num_requests_running / kv_cache_usage_perc never showed the running request"
    assert sample(after, "vllm:generation_tokens_total") - sample(before, "vllm:generation_tokens_total") == 122
    assert sample(after, "vllm:generation_tokens_total") == sample(after, "jetmoe:generation_tokens_total")
    assert sample(after, "vllm:prefix_cache_queries_total") > sample(before, "vllm:prefix_cache_queries_total")
    assert sample(after, "vllm:prefix_cache_hits_total") > sample(before, "vllm:prefix_cache_hits_total")
    assert sample(after, "vllm:num_requests_running") == 0 and sample(after, "vllm:kv_cache_usage_perc") == 0
    assert sample(after, "vllm:e2e_request_latency_seconds_count") == 2 + sample(
        before, "vllm:e2e_request_latency_seconds_count")


def test_without_the_flag_only_jetmoe_names(api_server) -> None:
    found = samples(httpx.get(f"{api_server.url}/metrics").text)
    assert "jetmoe:num_requests_waiting" in found and "jetmoe:cache_config_info" in found
    assert not any(name.startswith("vllm:") for name in found)

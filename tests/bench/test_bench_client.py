"""``python -m server.bench``: its pure parts on synthetic data, then the tool against our live server."""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest

from server.bench import BenchError, BenchmarkConfig, run_benchmark
from server.bench.arrivals import arrival_schedule, inter_arrival_gaps
from server.bench.cli import build_parser, config_from_args, main
from server.bench.client import build_payload
from server.bench.config import parse_rates
from server.bench.datasets import SampleRequest, length_bounds, load_requests
from server.bench.metrics import calculate_metrics, percentile
from server.bench.report import format_table, result_json, save_results
from server.bench.stream import RequestOutput, StreamRecorder, http_error_message, parse_sse_line

# ---- datasets ----


def test_random_token_prompts_are_seeded_and_sized() -> None:
    config = BenchmarkConfig(num_prompts=20, random_input_len=32, random_output_len=8, random_vocab_size=50, seed=7)
    first, again = load_requests(config), load_requests(config)
    assert [r.prompt for r in first] == [r.prompt for r in again]
    assert first != load_requests(BenchmarkConfig(**{**config.__dict__, "seed": 8}))
    for r in first:
        assert isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len == 32 and r.output_len == 8
        assert all(0 <= t < 50 for t in r.prompt)


def test_random_range_ratio_and_chat_text() -> None:
    config = BenchmarkConfig(endpoint="chat", num_prompts=200, random_input_len=100, random_output_len=10,
                             random_range_ratio=0.5, seed=1)
    requests = load_requests(config)
    assert all(isinstance(r.prompt, str) and len(r.prompt.split()) == r.prompt_len for r in requests)
    assert {r.prompt_len for r in requests} <= set(range(50, 151))
    assert min(r.prompt_len for r in requests) < 70 and max(r.prompt_len for r in requests) > 130
    assert {r.output_len for r in requests} <= set(range(5, 16))
    assert length_bounds(1, 0.9) == (1, 1)


def test_sharegpt_and_jsonl_files(tmp_path) -> None:
    convs = [{"conversations": [{"from": "human", "value": f"question {i}"}, {"from": "gpt", "value": "x" * 40}]}
             for i in range(5)] + [{"conversations": [{"from": "human", "value": "alone"}]}]
    share = tmp_path / "share.json"
    share.write_text(json.dumps(convs))
    config = BenchmarkConfig(dataset_name="sharegpt", dataset_path=str(share), num_prompts=3, seed=0)
    requests = load_requests(config)
    assert len(requests) == 3 and all(r.output_len == 10 and r.prompt.startswith("question") for r in requests)
    assert [r.prompt for r in requests] == [r.prompt for r in load_requests(config)]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt": [1, 2, 3]}\n')
    jsonl = load_requests(BenchmarkConfig(dataset_name="jsonl", dataset_path=str(lines), random_output_len=9))
    assert [(r.prompt, r.output_len) for r in jsonl] == [("hello there", 5), ([1, 2, 3], 9)]
    assert jsonl[1].prompt_len == 3
    with pytest.raises(BenchError, match="chat endpoint takes text"):
        load_requests(BenchmarkConfig(endpoint="chat", dataset_name="jsonl", dataset_path=str(lines)))
    with pytest.raises(BenchError, match="cannot read"):
        load_requests(BenchmarkConfig(dataset_name="jsonl", dataset_path=str(tmp_path / "missing.jsonl")))


# ---- arrivals ----


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_schedule(5, math.inf, 1.0, seed=0) == [0.0] * 5


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_arrival_gaps_have_the_rate_and_burstiness(burstiness: float) -> None:
    gaps = inter_arrival_gaps(20000, request_rate=4.0, burstiness=burstiness, rng=random.Random(0))
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.05)
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)  # gamma: coefficient of variation 1/sqrt(shape)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)
    schedule = arrival_schedule(10, 4.0, burstiness, seed=3)
    assert schedule[0] == 0.0 and schedule == sorted(schedule) and schedule == arrival_schedule(10, 4.0, burstiness, 3)


def test_rates_parse() -> None:
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    for bad in ("0", "fast", "-1"):
        with pytest.raises(BenchError):
            parse_rates(bad)


# ---- SSE parsing and per-request timings ----


def test_parse_sse_lines() -> None:
    assert parse_sse_line('data: {"a":1}') == '{"a":1}'
    assert parse_sse_line("data:[DONE]\r\n") == "[DONE]"
    for other in ("", ": ping", "event: error", "id: 3", "retry: 10"):
        assert parse_sse_line(other) is None


def _feed(events: list[tuple[float, object]], prompt_len: int = 4) -> RequestOutput:
    recorder = StreamRecorder(prompt_len)
    for now, event in events:
        recorder.on_data(event if isinstance(event, str) else json.dumps(event), now)
    return recorder.finish()


def _text(text: str, reason: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": reason}], "usage": None}


def test_stream_timings_use_content_chunks_and_usage_tokens() -> None:
    out = _feed([
        (0.10, _text("")),  # no content yet: not the first token
        (0.20, _text("Hel")),
        (0.25, _text("")),  # a token whose text is held back
        (0.35, _text("lo")),
        (0.50, _text(" you", "length")),
        (0.55, {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}}),
        (0.56, "[DONE]"),
    ])
    assert out.success and out.usage_reported and out.generated_text == "Hello you"
    assert out.ttft == 0.20 and out.latency == 0.50
    assert out.itl == pytest.approx([0.15, 0.15])
    assert (out.prompt_len, out.output_tokens) == (7, 5)  # the server's count, not the 3 content chunks


def test_chat_stream_skips_the_role_chunk() -> None:
    out = _feed([
        (0.1, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        (0.3, {"choices": [{"index": 0, "delta": {"content": "Hi"}}]}),
        (0.4, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        (0.5, "[DONE]"),
    ])
    assert out.success and out.ttft == 0.3 and out.latency == 0.4 and out.itl == []
    assert not out.usage_reported and out.output_tokens == 1 and out.prompt_len == 4


def test_stream_errors_fail_the_request() -> None:
    failed = _feed([(0.1, _text("a")), (0.2, {"error": {"message": "engine died", "type": "server_error"}})])
    assert not failed.success and failed.error == "engine died"
    assert not _feed([(0.1, "[DONE]")]).success
    assert not _feed([(0.1, "not json")]).success
    assert http_error_message(400, b'{"error": {"message": "bad prompt"}}') == "HTTP 400: bad prompt"
    assert http_error_message(502, b"Bad Gateway") == "HTTP 502: Bad Gateway"


def test_payloads() -> None:
    request = SampleRequest([1, 2, 3], 3, 16)
    body = build_payload(BenchmarkConfig(ignore_eos=True), "m", request)
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 16 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    chat = build_payload(BenchmarkConfig(endpoint="chat"), "m", SampleRequest("hi", 1, 4))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_completion_tokens"] == 4
    assert "ignore_eos" not in chat
    assert BenchmarkConfig(base_url="http://h:1/v1/").url == "http://h:1/v1/completions"
    assert BenchmarkConfig(base_url="http://h:1", endpoint="chat").url == "http://h:1/v1/chat/completions"


# ---- metrics ----


def test_percentile_matches_numpy_linear() -> None:
    values = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(values, 50) == 3.0 and percentile(values, 100) == 5.0 and percentile(values, 0) == 1.0
    assert percentile(values, 99) == pytest.approx(4.96) and percentile([], 99) == 0.0


def _synthetic_outputs() -> list[RequestOutput]:
    return [
        RequestOutput(success=True, prompt_len=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1, 0.1, 0.2]),
        RequestOutput(success=True, prompt_len=20, output_tokens=3, ttft=0.3, latency=0.5, itl=[0.1]),
        RequestOutput(success=True, prompt_len=30, output_tokens=1, ttft=0.2, latency=0.2, itl=[]),
        RequestOutput(success=False, prompt_len=40, error="HTTP 500: boom"),
    ]


def test_metrics_on_synthetic_timings() -> None:
    m = calculate_metrics(_synthetic_outputs(), duration=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed, m.total_input, m.total_output) == (3, 1, 60, 9)
    assert (m.request_throughput, m.output_throughput, m.total_token_throughput) == (1.5, 4.5, 34.5)
    ttft, tpot, itl, e2el = (m.latency[k] for k in ("ttft", "tpot", "itl", "e2el"))
    assert ttft.mean == pytest.approx(200.0) and ttft.median == pytest.approx(200.0)
    assert ttft.std == pytest.approx(statistics.pstdev([100.0, 300.0, 200.0]))
    assert ttft.percentiles[99] == pytest.approx(298.0)
    assert tpot.mean == pytest.approx(100.0)  # (0.5-0.1)/4 and (0.5-0.3)/2; one-token requests have none
    assert itl.median == pytest.approx(100.0) and itl.percentiles[50] == pytest.approx(100.0)
    assert e2el.mean == pytest.approx(400.0)
    empty = calculate_metrics([], duration=0.0, percentiles=[99])
    assert empty.latency["ttft"].mean == 0.0 and empty.request_throughput == 0.0


EXPECTED_FIELDS = {
    "date", "endpoint_type", "base_url", "model_id", "dataset_name", "num_prompts", "request_rate", "burstiness",
    "max_concurrency", "seed", "ignore_eos", "duration", "completed", "failed", "total_input_tokens",
    "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput", "usage_reported",
    "first_error", "input_lens", "output_lens", "ttfts", "itls", "e2els", "errors",
} | {f"{stat}_{name}_ms" for stat in ("mean", "median", "std", "p99") for name in ("ttft", "tpot", "itl", "e2el")}


def test_report_table_and_json(tmp_path) -> None:
    from server.bench.runner import BenchmarkResult

    outputs = _synthetic_outputs()
    config = BenchmarkConfig(request_rate=2.0)
    result = BenchmarkResult(config, "m", calculate_metrics(outputs, 2.0, [99.0]), outputs, "20250101-000000")
    table = format_table(result)
    for label in ("Successful requests:", "Failed requests:", "Mean TTFT (ms):", "P99 TPOT (ms):",
                  "Median ITL (ms):", "Std E2EL (ms):", "Output token throughput (tok/s):", "First error: HTTP"):
        assert label in table
    record = result_json(result)
    assert set(record) == EXPECTED_FIELDS and record["request_rate"] == 2.0
    save_results(tmp_path / "two.json", [result, result])
    assert len(json.loads((tmp_path / "two.json").read_text())["runs"]) == 2


def test_cli_flags_and_errors(capsys, tmp_path) -> None:
    args = build_parser().parse_args(["--request-rate", "1,inf", "--max-concurrency", "4", "--ignore-eos",
                                      "--endpoint", "chat", "--metric-percentiles", "50,99"])
    config, rates = config_from_args(args)
    assert rates == [1.0, math.inf] and config.max_concurrency == 4 and config.ignore_eos
    assert config.endpoint == "chat" and config.metric_percentiles == [50.0, 99.0]
    assert main(["--random-range-ratio", "1.5"]) == 1
    assert "--random-range-ratio" in capsys.readouterr().err
    unreachable = ["--base-url", "http://127.0.0.1:9", "--num-prompts", "1", "--disable-tqdm"]
    assert main(unreachable) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, capsys, tmp_path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["--base-url", "http://127.0.0.1:9", "--plot", str(tmp_path / "p.png")]) == 1
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


# ---- against our live server ----

OUTPUT_LEN = 16


@pytest.fixture(scope="module")
def bench_server(engine_checkpoint):
    """Our OpenAI-compatible server on the tiny checkpoint, for this module's benchmark runs."""
    from tests.support.live_server import live_server

    with live_server(engine_checkpoint[0]) as server:
        yield server


def _server_counters(url: str) -> dict[str, float]:
    """The server's own Prometheus token counters (``jetmoe:*_tokens_total``)."""
    import httpx

    from tests.support.prom import sample

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {name: sample(text, f"jetmoe:{name}") for name in ("prompt_tokens_total", "generation_tokens_total")}


def test_live_benchmark_counts_match_the_server(bench_server, engine_checkpoint) -> None:
    config = BenchmarkConfig(
        base_url=bench_server.url, num_prompts=8, random_input_len=24, random_output_len=OUTPUT_LEN,
        random_vocab_size=engine_checkpoint[1].config.vocab_size, request_rate=math.inf, max_concurrency=4,
        ignore_eos=True, seed=0, disable_tqdm=True,
    )
    before = _server_counters(bench_server.url)
    result = run_benchmark(config)
    after = _server_counters(bench_server.url)
    m = result.metrics
    assert result.model == "tiny-jetmoe" and result.first_error is None
    assert (m.completed, m.failed, m.usage_reported) == (8, 0, 8)
    assert [o.output_tokens for o in result.outputs] == [OUTPUT_LEN] * 8  # from each usage chunk
    assert m.total_output == 8 * OUTPUT_LEN == after["generation_tokens_total"] - before["generation_tokens_total"]
    assert m.total_input == 8 * 24 == after["prompt_tokens_total"] - before["prompt_tokens_total"]
    assert all(0 < o.ttft <= o.latency and len(o.generated_text) > 0 for o in result.outputs)
    assert m.latency["tpot"].mean > 0 and m.latency["e2el"].percentiles[99] >= m.latency["e2el"].median
    assert m.output_throughput == pytest.approx(m.total_output / m.duration)
    record = result_json(result)
    assert set(record) == EXPECTED_FIELDS and record["output_lens"] == [OUTPUT_LEN] * 8
    assert json.loads(json.dumps(record, allow_nan=False)) == record  # strict JSON: no NaN or Infinity


def _cli_args(server, saved) -> list[str]:
    return ["--base-url", server.base_url, "--num-prompts", "4", "--random-input-len", "16",
            "--random-output-len", "8", "--ignore-eos", "--seed", "0", "--disable-tqdm", "--save-result", str(saved)]


def test_live_cli_prints_the_table_and_saves_every_field(bench_server, capsys, tmp_path) -> None:
    saved = tmp_path / "result.json"
    assert main(_cli_args(bench_server, saved)) == 0
    table = capsys.readouterr().out
    assert "Successful requests:                     4" in table and "Mean TPOT (ms):" in table
    record = json.loads(saved.read_text())
    assert set(record) == EXPECTED_FIELDS and record["request_rate"] == "inf"
    assert (record["completed"], record["failed"], record["total_output_tokens"]) == (4, 0, 32)
    assert record["output_lens"] == [8] * 4 and record["errors"] == [""] * 4


def test_live_chat_at_several_rates_with_a_plot(bench_server, capsys, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    saved, plot = tmp_path / "rates.json", tmp_path / "rates.png"
    argv = [*_cli_args(bench_server, saved), "--endpoint", "chat", "--request-rate", "50,inf", "--plot", str(plot)]
    assert main(argv) == 0
    assert "TTFT p50" in capsys.readouterr().out  # the per-rate summary
    runs = json.loads(saved.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, "inf"] and all(r["completed"] == 4 for r in runs)
    assert all(r["endpoint_type"] == "openai-chat" and r["total_output_tokens"] == 32 for r in runs)
    assert plot.stat().st_size > 10_000

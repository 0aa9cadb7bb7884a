#!/usr/bin/env python
"""Soak test: a mixed workload against one server for a bounded time, then a report.

    python scripts/soak.py [--duration 180] [--concurrency 8] [--max-requests N]
    python scripts/soak.py --base-url http://127.0.0.1:8000 [--api-key KEY] [--server-pid PID]

Without ``--base-url`` it builds a small random JetMoe checkpoint (a tokenizer trained on a few standard-library
files, random weights; or ``--model DIR``) and serves it in this process on a free 127.0.0.1 port. Only loopback
addresses are accepted. Workers send, until ``--duration`` seconds or ``--max-requests`` requests: completions
and chats, streamed and not, n > 1 and best_of, stop strings, logprobs, streams dropped early by the client,
invalid requests (which must get an OpenAI-shaped 4xx), and a fixed greedy request whose text must never change.

Reported: requests by kind and status, errors (5xx, unexpected statuses, broken streams, transport errors,
greedy drift), the engine after the load (running and waiting requests, KV blocks in use once idle) and the
resident memory (RSS) at the start, the peak and the end. Exit status 1 when there was any error or leak.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

PROMPTS = ["The quick brown fox", "Hello, world! How are you today?", "def main(argv):",
           "Once upon a time there was a little llama", "import os\nimport sys\n", "I love reading books",
           "The model answered the question with a short", "class Foo(object):\n    def"]
GREEDY = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
INVALID = [  # (body, expected status)
    (b'{"prompt": "hi", "max_tokens": 0}', 400),
    (b'{"prompt": "hi", "temperature": NaN}', 400),
    (b'{"prompt": "hi"', 400),
    (b'{"prompt": "caf\xe9"}', 400),
    (b'{"prompt": "a\\ud800"}', 400),
    (b'{"prompt": [1, 999999999]}', 400),
    (b'{"prompt": ""}', 400),
    (b'{"prompt": "hi", "n": 1000}', 400),
    (b'{"prompt": "hi", "logprobs": 50}', 400),
    (b'{"prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}', 400),
    (b'{"prompt": "hi", "max_tokens": 100000}', 400),
    (b'{"messages": []}', 400),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
    (b'{"model": "no-such-model", "prompt": "hi"}', 404),
]
KINDS = {  # kind -> weight
    "completion": 18, "completion_stream": 14, "chat": 12, "chat_stream": 10, "n_best_of": 8, "stop": 7,
    "logprobs": 6, "disconnect": 12, "invalid": 9, "greedy": 4,
}


@dataclass
class Tally:
    by_kind: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    tokens: int = 0
    overloaded: int = 0

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {what}")


class Soak:
    def __init__(self, base_url: str, api_key: str | None, rng: random.Random, tally: Tally) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.rng = rng
        self.tally = tally
        self.greedy_text: str | None = None

    async def run(self, http: httpx.AsyncClient, kind: str) -> None:
        self.tally.by_kind[kind] += 1
        try:
            await getattr(self, f"_{kind}")(http)
        except (httpx.HTTPError, OSError) as exc:
            self.tally.error(kind, f"transport error {type(exc).__name__}: {exc}")
        except (AssertionError, KeyError, ValueError, TypeError, IndexError) as exc:
            self.tally.error(kind, f"bad answer: {exc!r}"[:300])

    # ---- one request of each kind ----

    async def _completion(self, http: httpx.AsyncClient) -> None:
        body = self._sampling({"prompt": self._prompts(), "max_tokens": self.rng.randint(1, 32)})
        data = await self._post(http, "/v1/completions", body, "completion")
        if data is not None:
            prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
            assert len(data["choices"]) == len(prompts), "one choice per prompt"

    async def _completion_stream(self, http: httpx.AsyncClient) -> None:
        body = self._sampling({"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(1, 48),
                               "stream": True, "stream_options": {"include_usage": True}})
        chunks = await self._stream(http, "/v1/completions", body, "completion_stream")
        if chunks is not None:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1, "usage chunk"

    async def _chat(self, http: httpx.AsyncClient) -> None:
        body = self._sampling({"messages": self._messages(), "max_tokens": self.rng.randint(1, 32)})
        data = await self._post(http, "/v1/chat/completions", body, "chat")
        if data is not None:
            assert data["choices"][0]["message"]["role"] == "assistant"

    async def _chat_stream(self, http: httpx.AsyncClient) -> None:
        body = self._sampling({"messages": self._messages(), "max_tokens": self.rng.randint(1, 48), "stream": True})
        chunks = await self._stream(http, "/v1/chat/completions", body, "chat_stream")
        if chunks is not None:
            assert chunks[0]["choices"][0]["delta"].get("role") == "assistant", "role in the first chunk"

    async def _n_best_of(self, http: httpx.AsyncClient) -> None:
        n = self.rng.randint(2, 4)
        body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": self.rng.randint(4, 24), "n": n,
                "temperature": 1.0, "seed": self.rng.randint(0, 10**6)}
        if self.rng.random() < 0.5:
            body["best_of"] = n + self.rng.randint(0, 2)
        elif self.rng.random() < 0.5:
            body["stream"] = True
            chunks = await self._stream(http, "/v1/completions", body, "n_best_of")
            if chunks is not None:
                assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == set(range(n)), "n streams"
            return
        data = await self._post(http, "/v1/completions", body, "n_best_of")
        if data is not None:
            assert sorted(c["index"] for c in data["choices"]) == list(range(n)), "n choices"

    async def _stop(self, http: httpx.AsyncClient) -> None:
        stop = self.rng.sample([" ", "e", "\n", "the", ".", ":", "a"], self.rng.randint(1, 3))
        body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": 32, "stop": stop,
                "temperature": self.rng.choice([0, 0.8])}
        data = await self._post(http, "/v1/completions", body, "stop")
        if data is not None:
            choice = data["choices"][0]
            assert not any(s in choice["text"] for s in stop), "a stop string in the text"
            assert choice["finish_reason"] in ("stop", "length")

    async def _logprobs(self, http: httpx.AsyncClient) -> None:
        if self.rng.random() < 0.5:
            body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": 8, "logprobs": self.rng.randint(0, 5),
                    "echo": self.rng.random() < 0.3}
            data = await self._post(http, "/v1/completions", body, "logprobs")
            if data is not None:
                assert data["choices"][0]["logprobs"]["tokens"], "logprobs"
        else:
            body = {"messages": self._messages(), "max_tokens": 8, "logprobs": True,
                    "top_logprobs": self.rng.randint(0, 5)}
            data = await self._post(http, "/v1/chat/completions", body, "logprobs")
            if data is not None:
                assert data["choices"][0]["logprobs"]["content"], "logprobs"

    async def _disconnect(self, http: httpx.AsyncClient) -> None:
        body = {"prompt": self.rng.choice(PROMPTS), "max_tokens": 200, "ignore_eos": True, "stream": True}
        leave_after = self.rng.randint(0, 8)
        async with http.stream("POST", "/v1/completions", json=body, headers=self.headers) as response:
            self._count(response.status_code)
            if response.status_code == 429:
                return
            assert response.status_code == 200, f"status {response.status_code}"
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if events > leave_after:
                        return  # leaving closes the connection mid-stream

    async def _invalid(self, http: httpx.AsyncClient) -> None:
        if self.rng.random() < 0.1:
            content, expected = b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}', 413
        else:
            content, expected = self.rng.choice(INVALID)
        path = "/v1/chat/completions" if content.startswith(b'{"messages"') else "/v1/completions"
        response = await http.post(path, content=content,
                                   headers={**self.headers, "content-type": "application/json"})
        self._count(response.status_code)
        if response.status_code != expected:
            self.tally.error("invalid", f"{content[:60]!r}: status {response.status_code}, expected {expected}")
            return
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], "OpenAI error shape"

    async def _greedy(self, http: httpx.AsyncClient) -> None:
        data = await self._post(http, "/v1/completions", GREEDY, "greedy")
        if data is None:
            return
        text = data["choices"][0]["text"]
        if self.greedy_text is None:
            self.greedy_text = text
        elif text != self.greedy_text:
            self.tally.error("greedy", f"greedy text drifted: {text!r} != {self.greedy_text!r}")

    # ---- helpers ----

    def _prompts(self) -> str | list[str]:
        if self.rng.random() < 0.2:
            return self.rng.sample(PROMPTS, self.rng.randint(2, 3))
        return self.rng.choice(PROMPTS)

    def _messages(self) -> list[dict[str, str]]:
        messages = [{"role": "user", "content": self.rng.choice(PROMPTS)}]
        if self.rng.random() < 0.3:
            messages = [{"role": "system", "content": "Be brief."}, *messages,
                        {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "Go on"}]
        return messages

    def _sampling(self, body: dict[str, Any]) -> dict[str, Any]:
        roll = self.rng.random()
        if roll < 0.3:
            body["temperature"] = 0
        elif roll < 0.8:
            body.update(temperature=self.rng.choice([0.5, 0.8, 1.0]), top_p=self.rng.choice([0.9, 1.0]),
                        top_k=self.rng.choice([0, 20]), seed=self.rng.randint(0, 10**6))
        return body

    def _count(self, status: int) -> None:
        self.tally.statuses[status] += 1
        if status == 429:
            self.tally.overloaded += 1
        elif status >= 500:
            self.tally.errors["5xx"] += 1

    async def _post(self, http: httpx.AsyncClient, path: str, body: dict, kind: str) -> dict | None:
        response = await http.post(path, json=body, headers=self.headers)
        self._count(response.status_code)
        if response.status_code == 429:
            return None
        if response.status_code != 200:
            self.tally.error(kind, f"status {response.status_code}: {response.text[:200]}")
            return None
        data = response.json()
        self.tally.tokens += data["usage"]["completion_tokens"]
        return data

    async def _stream(self, http: httpx.AsyncClient, path: str, body: dict, kind: str) -> list[dict] | None:
        async with http.stream("POST", path, json=body, headers=self.headers) as response:
            self._count(response.status_code)
            if response.status_code == 429:
                return None
            if response.status_code != 200:
                await response.aread()
                self.tally.error(kind, f"status {response.status_code}: {response.text[:200]}")
                return None
            events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            self.tally.error(kind, f"stream did not end with [DONE]: {events[-1:]!r}")
            return None
        chunks = [json.loads(e) for e in events[:-1]]
        for chunk in chunks:
            if "error" in chunk:
                self.tally.error(kind, f"error event: {chunk['error']}")
                return None
        self.tally.tokens += sum(1 for c in chunks if c["choices"] and (c["choices"][0].get("text")
                                                                         or c["choices"][0].get("delta", {}).get("content")))
        return chunks


# ---- the server under test ----


@dataclass
class Target:
    base_url: str
    engine: Any = None  # the engine client of a server started here, if any
    pid: int | None = None


def build_checkpoint(out: Path, seed: int) -> Path:
    """A tokenizer trained on a few standard-library files and a random 2-layer JetMoe (a few seconds)."""
    from tests.support.checkpoints import TinyShape, save_checkpoint_with_tokenizer

    stdlib = Path(os.__file__).parent
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("os.py", "textwrap.py", "argparse.py")]
    save_checkpoint_with_tokenizer(TinyShape(vocab_size=1000), out, texts + PROMPTS * 20, seed, perturb=False)
    return out


@contextmanager
def local_server(model_dir: Path, max_queued: int | None) -> Iterator[Target]:
    from server.api import ServerSettings
    from tests.support.live_server import live_server

    settings = ServerSettings(served_model_name="soak", max_queued_requests=max_queued)
    with live_server(model_dir, settings, num_kv_blocks=512, max_num_seqs=32) as server:
        yield Target(server.url, server.engine, os.getpid())


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"soak: refusing {url!r}: only loopback servers (127.0.0.0/8, ::1, localhost)")


# ---- the run ----


def metric(text: str, name: str) -> float | None:
    """The value of the first sample called ``name`` (any labels), None when the server has none."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


class Memory:
    """RSS of the server process, sampled once a second; growth is counted from the end of the warm-up (the
    first tenth of the run, at most 30 s), after first-use allocations (caches, pools, lazy imports)."""

    def __init__(self, pid: int | None) -> None:
        self.process = psutil.Process(pid) if pid else None
        self.peak: int | None = None
        self.warm: int | None = None
        self.start = self.end = self.sample()

    def sample(self) -> int | None:
        if self.process is None:
            return None
        rss = self.process.memory_info().rss
        self.peak = max(self.peak or 0, rss)
        return rss


async def drive(target: Target, args: argparse.Namespace, tally: Tally, memory: Memory) -> float:
    rng = random.Random(args.seed)
    soak = Soak(target.base_url, args.api_key, rng, tally)
    kinds, weights = list(KINDS), list(KINDS.values())
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    started = time.monotonic()
    deadline = started + args.duration
    sent = 0

    async with httpx.AsyncClient(base_url=target.base_url, timeout=args.request_timeout, limits=limits) as http:
        await soak.run(http, "greedy")  # the reference answer for the drift check

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline and (args.max_requests is None or sent < args.max_requests):
                sent += 1
                await soak.run(http, rng.choices(kinds, weights)[0])

        async def sampler() -> None:
            last = started
            warm_up = min(args.duration / 10, 30.0)
            while time.monotonic() < deadline:
                await asyncio.sleep(1.0)
                rss = memory.sample()
                now = time.monotonic()
                if memory.warm is None and now - started >= warm_up:
                    memory.warm = rss
                if args.progress and now - last >= args.progress:
                    last = now
                    shown = "" if rss is None else f", RSS {rss / 2**20:.1f} MiB"
                    print(f"  {now - started:5.0f} s  {sum(tally.by_kind.values())} requests, "
                          f"{sum(tally.errors.values())} errors{shown}", flush=True)

        watcher = asyncio.create_task(sampler())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        watcher.cancel()
    return time.monotonic() - started


def idle_state(target: Target, api_key: str | None, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until nothing runs, then read what is still held (through the engine, or /metrics)."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while True:
        text = httpx.get(f"{target.base_url}/metrics", headers=headers, timeout=10).text
        state = {"running": metric(text, "jetmoe:num_requests_running"),
                 "waiting": metric(text, "jetmoe:num_requests_waiting"),
                 "kv_cache_usage": metric(text, "jetmoe:kv_cache_usage_perc")}
        if target.engine is not None:
            stats, blocks = target.engine.stats(), target.engine.num_kv_blocks
            state.update(kv_blocks_used=round(stats.kv_cache_usage * blocks), kv_blocks=blocks,
                         unfinished=target.engine.num_unfinished)
        if (state["running"] == 0 and state["waiting"] == 0 and state["kv_cache_usage"] == 0
                and state.get("kv_blocks_used", 0) == 0 and state.get("unfinished", 0) == 0):
            return state
        if time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def report(tally: Tally, elapsed: float, idle: dict[str, Any], memory: Memory) -> dict[str, Any]:
    total = sum(tally.by_kind.values())
    errors = sum(tally.errors.values())
    leaked = (idle.get("running") or 0) + (idle.get("waiting") or 0) + (idle.get("kv_blocks_used") or 0) + (
        1 if idle.get("kv_cache_usage") else 0)
    summary = {
        "duration_s": round(elapsed, 1), "requests": total, "requests_per_s": round(total / elapsed, 2),
        "by_kind": dict(tally.by_kind.most_common()), "statuses": dict(sorted(tally.statuses.items())),
        "completion_tokens_seen": tally.tokens, "overloaded_429": tally.overloaded,
        "errors": errors, "errors_by_kind": dict(tally.errors), "error_examples": tally.examples,
        "after_idle": idle, "leaked": leaked,
        "rss_mib": {"start": _mib(memory.start), "after_warm_up": _mib(memory.warm), "peak": _mib(memory.peak),
                    "end": _mib(memory.end), "growth_after_warm_up": _mib(
                        None if memory.warm is None or memory.end is None else memory.end - memory.warm)},
    }
    print(f"soak: {total} requests in {elapsed:.0f} s ({total / elapsed:.1f}/s), "
          f"{tally.tokens} completion tokens seen")
    print("  by kind:  " + ", ".join(f"{k} {v}" for k, v in tally.by_kind.most_common()))
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(tally.statuses.items())))
    print(f"  errors:   {errors}" + (" (" + ", ".join(f"{k} {v}" for k, v in tally.errors.items()) + ")"
                                      if errors else " (no 5xx, no unexpected status, no broken stream)"))
    for example in tally.examples:
        print(f"    - {example}")
    print(f"  after idle: {json.dumps(idle)} -> leaked: {leaked}")
    rss = summary["rss_mib"]
    if rss["start"] is not None:
        growth = rss["growth_after_warm_up"]
        print(f"  RSS: start {rss['start']} MiB, after warm-up {rss['after_warm_up']} MiB, peak {rss['peak']} MiB, "
              f"end {rss['end']} MiB (growth after warm-up: {'n/a' if growth is None else f'{growth:+} MiB'})")
    print("soak: " + ("OK" if errors == 0 and leaked == 0 else "FAILED"))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="a running server on loopback (default: start one in-process)")
    parser.add_argument("--api-key", help="the server's API key, with --base-url")
    parser.add_argument("--server-pid", type=int, help="the --base-url server's process, for its RSS")
    parser.add_argument("--model", type=Path, help="checkpoint for the in-process server (default: build one)")
    parser.add_argument("--max-queued-requests", type=int, default=64, help="of the in-process server")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--progress", type=float, default=30.0, help="print progress every N s (0: never)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 3600 or args.concurrency < 1 or args.concurrency > 256:
        parser.error("--duration must be in (0, 3600] and --concurrency in [1, 256]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tally = Tally()
    with _target(args) as target:
        memory = Memory(target.pid)
        elapsed = asyncio.run(drive(target, args, tally, memory))
        idle = idle_state(target, args.api_key)
        memory.end = memory.sample()
    summary = report(tally, elapsed, idle, memory)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["errors"] == 0 and summary["leaked"] == 0 else 1


@contextmanager
def _target(args: argparse.Namespace) -> Iterator[Target]:
    if args.base_url:
        require_loopback(args.base_url)
        yield Target(args.base_url.rstrip("/"), pid=args.server_pid)
        return
    with tempfile.TemporaryDirectory(prefix="soak-ckpt-") as tmp:
        model = args.model or build_checkpoint(Path(tmp), args.seed)
        with local_server(model, args.max_queued_requests) as target:
            yield target


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())

"""A server with speculative decoding answers exactly as one without it: completions and chat, streamed or
not, with logprobs, stop strings, seeds and ``n``; its ``/metrics`` count the proposals. (A stream may bring
several tokens per event under speculation: streams are compared as the choices their events add up to.)"""

from __future__ import annotations

import json

import httpx
import pytest

from server.api import ServerSettings
from server.engine.spec import SpeculativeConfig
from tests.support.live_server import SERVED_NAME, live_server
from tests.support.prom import sample

PROMPT = "x = 1\ny = 2\nx = 1\ny = 2\nx = 1\n"
BODIES = [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "logprobs": 2}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": True, "logprobs": 1}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "temperature": 0.9, "seed": 4, "n": 2}),
    ("/v1/completions", {"prompt": [PROMPT, "def f(x):\n    return x\n"], "max_tokens": 16, "temperature": 0,
                         "stop": ["\n\n", "= 2"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 20,
                              "temperature": 0, "logprobs": True, "top_logprobs": 2, "stream": True}),
]


def rounded(value):
    """Floats to 3 decimals (logprobs of a verifying forward differ from a one-token one in the last bits)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def merged(into: dict, part: dict) -> dict:
    """One stream event's choice added to the choice so far: text joined, lists extended, the rest updated."""
    for key, value in part.items():
        if isinstance(value, (str, list)) and type(into.get(key)) is type(value):
            into[key] += value
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            merged(into[key], value)
        elif value is not None or key not in into:
            into[key] = value
    return into


def answers(url: str) -> list:
    """Each body's answer without its ids and timestamps (streams: the concatenated events' choices)."""
    results = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for path, body in BODIES:
            response = http.post(path, json={"model": SERVED_NAME, **body})
            assert response.status_code == 200, response.text
            if body.get("stream"):
                events = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
                choices: dict[int, dict] = {}
                for choice in (c for event in events for c in event["choices"]):
                    merged(choices.setdefault(choice["index"], {}), choice)
                results.append(choices)
            else:
                answer = response.json()
                results.append((answer["choices"], answer["usage"]))
    return rounded(results)


@pytest.fixture(scope="module")
def plain_answers(engine_checkpoint):
    with live_server(engine_checkpoint[0]) as server:
        return answers(server.url)


def test_speculation_changes_no_answer(engine_checkpoint, plain_answers) -> None:
    spec = SpeculativeConfig(4, prompt_lookup_min=1, prompt_lookup_max=3)
    settings = ServerSettings(served_model_name=SERVED_NAME, export_vllm_metrics=True)
    with live_server(engine_checkpoint[0], settings, speculative_config=spec) as server:
        assert answers(server.url) == plain_answers
        metrics = httpx.get(f"{server.url}/metrics").text
    drafts = sample(metrics, "vllm:spec_decode_num_drafts_total")
    accepted = sample(metrics, "jetmoe:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= sample(metrics, "vllm:spec_decode_num_draft_tokens_total")

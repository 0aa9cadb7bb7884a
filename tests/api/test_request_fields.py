"""vLLM's request fields on /v1/completions through a live server, with raw httpx and the openai SDK.

Usage with cached tokens, min_tokens, allowed_token_ids, bad_words, truncate_prompt_tokens, prompt_logprobs,
echo with max_tokens 0, return_tokens_as_token_ids, stop_reason and include_stop_str_in_output; and the
400s for values that cannot be honoured.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
import torch

from server.engine.logit_masks import bad_words_token_ids
from tests.support.engine import hf_greedy
from tests.support.live_server import SERVED_NAME

MODEL = SERVED_NAME
PROMPT = "def fibonacci(n):"


def complete(http: httpx.Client, **body) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(http: httpx.Client, **body) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "stream": True, "temperature": 0,
                                                       **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def ids_of(tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in tokens)
    return [int(t.split(":")[1]) for t in tokens]


def random_ids(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def test_cached_tokens_equal_the_prefix_cache_hit(http, client, api_server, tokenizer) -> None:
    prompt = random_ids(11, 40, tokenizer.vocab_size)  # 2 full blocks of 16 + 8 tokens
    first = complete(http, prompt=prompt, max_tokens=2)
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    hits = api_server.engine.stats().prefix_cache_hits
    second = complete(http, prompt=prompt, max_tokens=2)
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert api_server.engine.stats().prefix_cache_hits - hits == 32
    sdk = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert sdk.usage.prompt_tokens_details.cached_tokens == 32
    chunks = stream(http, prompt=prompt, max_tokens=3, stream_options={"include_usage": True})
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_continuous_usage_on_every_chunk(http, tokenizer) -> None:
    chunks = stream(http, prompt=PROMPT, max_tokens=5, ignore_eos=True, logprobs=0,
                    stream_options={"include_usage": True, "continuous_usage_stats": True})
    prompt_len = len(tokenizer.encode(PROMPT))
    usages = [c["usage"] for c in chunks]
    assert all(u["prompt_tokens"] == prompt_len for u in usages)
    assert all(u["total_tokens"] == prompt_len + u["completion_tokens"] for u in usages)
    streamed = 0  # a slow reader may get several tokens in one chunk: count them from the logprobs
    for chunk in chunks[:-1]:
        streamed += len(chunk["choices"][0]["logprobs"]["tokens"])
        assert chunk["usage"]["completion_tokens"] == streamed
    assert streamed == 5 and chunks[-1]["choices"] == [] and usages[-1]["completion_tokens"] == 5


def test_min_tokens_with_forced_eos(http, client, tokenizer) -> None:
    eos = tokenizer.eos_token_id
    body = {"prompt": PROMPT, "max_tokens": 20, "logit_bias": {str(eos): 100}, "logprobs": 0,
            "return_tokens_as_token_ids": True}
    assert ids_of(complete(http, **body)["choices"][0]["logprobs"]["tokens"]) == [eos]
    result = complete(http, **body, min_tokens=5)
    choice = result["choices"][0]
    ids = ids_of(choice["logprobs"]["tokens"])
    assert len(ids) == 6 and ids[-1] == eos and eos not in ids[:5]
    assert result["usage"]["completion_tokens"] == 6
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", None)
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, logprobs=0,
                                    logit_bias={str(eos): 100},
                                    extra_body={"min_tokens": 3, "return_tokens_as_token_ids": True})
    assert ids_of(sdk.choices[0].logprobs.tokens)[3:] == [eos] and sdk.usage.completion_tokens == 4


def test_return_tokens_as_token_ids_equal_the_greedy_reference(http, client, engine_checkpoint, tokenizer) -> None:
    prompt = tokenizer.encode(PROMPT)
    reference, trusted = hf_greedy(engine_checkpoint[1], prompt, 8)
    assert trusted >= 4
    result = complete(http, prompt=PROMPT, max_tokens=trusted, ignore_eos=True, logprobs=2,
                      return_tokens_as_token_ids=True)
    logprobs = result["choices"][0]["logprobs"]
    assert ids_of(logprobs["tokens"]) == reference[:trusted]
    assert all(f"token_id:{t}" in top for t, top in zip(reference, logprobs["top_logprobs"]))
    assert all(all(k.startswith("token_id:") for k in top) for top in logprobs["top_logprobs"])
    text = result["choices"][0]["text"]
    assert logprobs["text_offset"][-1] < len(text)  # offsets still count the text, not the labels
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=trusted, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    assert ids_of(sdk.choices[0].logprobs.tokens) == reference[:trusted]
    chat = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
        "logprobs": True, "top_logprobs": 1, "return_tokens_as_token_ids": True}).json()
    entry = chat["choices"][0]["logprobs"]["content"][0]
    assert entry["token"].startswith("token_id:") and entry["bytes"] == list(entry["token"].encode())


def test_allowed_token_ids_stay_in_the_set(http, client, tokenizer) -> None:
    allowed = [5, 17, 256, 300, tokenizer.eos_token_id]
    result = complete(http, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=4, allowed_token_ids=allowed,
                      logprobs=0, return_tokens_as_token_ids=True)
    ids = ids_of(result["choices"][0]["logprobs"]["tokens"])
    assert ids and set(ids) <= set(allowed)
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, logprobs=0, seed=1,
                                    extra_body={"allowed_token_ids": [300, 301], "return_tokens_as_token_ids": True})
    assert set(ids_of(sdk.choices[0].logprobs.tokens)) <= {300, 301} and sdk.usage.completion_tokens == 8


def test_bad_words_are_never_generated(http, client, tokenizer) -> None:
    (token,) = tokenizer.encode("fox", add_special_tokens=False)
    assert bad_words_token_ids(tokenizer, ["fox"]) == ((token,),)
    body = {"prompt": PROMPT, "max_tokens": 6, "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True,
            "logit_bias": {str(token): 30}}
    assert ids_of(complete(http, **body)["choices"][0]["logprobs"]["tokens"]) == [token] * 6
    banned = ids_of(complete(http, **body, bad_words=[" fox"])["choices"][0]["logprobs"]["tokens"])
    assert len(banned) == 6 and token not in banned
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=0,
                                    logit_bias={str(token): 30},
                                    extra_body={"bad_words": ["fox"], "return_tokens_as_token_ids": True})
    assert token not in ids_of(sdk.choices[0].logprobs.tokens)


def test_truncate_prompt_tokens(http, client, tokenizer) -> None:
    prompt = random_ids(5, 30, tokenizer.vocab_size)
    result = complete(http, prompt=prompt, max_tokens=4, ignore_eos=True, truncate_prompt_tokens=10)
    assert result["usage"]["prompt_tokens"] == 10
    assert result["choices"][0]["text"] == complete(http, prompt=prompt[-10:], max_tokens=4,
                                                    ignore_eos=True)["choices"][0]["text"]
    sdk = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                    extra_body={"truncate_prompt_tokens": 7})
    assert sdk.usage.prompt_tokens == 7
    chat = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 50}],
                                                   "max_tokens": 1, "truncate_prompt_tokens": 6}).json()
    assert chat["usage"]["prompt_tokens"] == 6


def _hf_prompt_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()  # [P, V]
    return torch.log_softmax(logits, dim=-1)  # [P, V]


def test_echo_with_max_tokens_zero_scores_the_prompt(http, client, engine_checkpoint, tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    reference = _hf_prompt_logprobs(engine_checkpoint[1], ids)
    result = complete(http, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    (choice,) = result["choices"]
    assert choice["text"] == tokenizer.decode(ids) and choice["finish_reason"] == "length"
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    for i, value in enumerate(logprobs["token_logprobs"][1:], start=1):
        assert abs(value - reference[i - 1, ids[i]].item()) < 1e-4
    assert result["usage"]["completion_tokens"] == 0 and result["usage"]["prompt_tokens"] == len(ids)
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert sdk.choices[0].text == choice["text"] and sdk.usage.completion_tokens == 0
    assert sdk.choices[0].logprobs.token_logprobs == logprobs["token_logprobs"]
    chunks = stream(http, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks) == len(ids)


def test_prompt_logprobs_field(http, client, engine_checkpoint, tokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    reference = _hf_prompt_logprobs(engine_checkpoint[1], ids)
    echoed = complete(http, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)["choices"][0]["logprobs"]["tokens"]
    result = complete(http, prompt=PROMPT, max_tokens=1, prompt_logprobs=2)
    field = result["choices"][0]["prompt_logprobs"]
    assert len(field) == len(ids) and field[0] is None
    for i, position in enumerate(field[1:], start=1):
        row = reference[i - 1]
        mine = position[str(ids[i])]
        assert abs(mine["logprob"] - row[ids[i]].item()) < 1e-4
        assert mine["rank"] == int((row > row[ids[i]]).sum()) + 1
        assert mine["decoded_token"] == echoed[i]
        top = row.topk(2).indices.tolist()
        assert [position[str(t)]["rank"] for t in top] == [1, 2]
        assert set(position) == {str(ids[i]), *map(str, top)}
    assert result["choices"][0]["logprobs"] is None
    sdk = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, extra_body={"prompt_logprobs": 0})
    sdk_field = sdk.choices[0].model_extra["prompt_logprobs"]
    assert sdk_field[0] is None and all(list(p) == [str(t)] for p, t in zip(sdk_field[1:], ids[1:]))


def test_stop_reason_and_include_stop_str_in_output(http, client) -> None:
    text = complete(http, prompt=PROMPT, max_tokens=10, ignore_eos=True)["choices"][0]["text"]
    stop = text[2:4]
    cut = text.find(stop)
    choice = complete(http, prompt=PROMPT, max_tokens=10, ignore_eos=True, stop=[stop])["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text[:cut], "stop", stop)
    kept = complete(http, prompt=PROMPT, max_tokens=10, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept["choices"][0]["text"] == text[: cut + len(stop)]
    chunks = stream(http, prompt=PROMPT, max_tokens=10, ignore_eos=True, stop=[stop])
    assert chunks[-1]["choices"][0]["stop_reason"] == stop
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:cut]
    first = complete(http, prompt=PROMPT, max_tokens=3, logprobs=0, return_tokens_as_token_ids=True,
                     ignore_eos=True)["choices"][0]
    token = ids_of(first["logprobs"]["tokens"])[1]
    by_id = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0,
                                      extra_body={"stop_token_ids": [token], "ignore_eos": True})
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["stop_reason"] == token
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].model_extra["stop_reason"] is None


@pytest.mark.parametrize(("body", "param"), [
    ({"allowed_token_ids": [10**6]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"echo": True, "max_tokens": 0, "min_tokens": 1}, "min_tokens"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"bad_words": [""]}, "bad_words"),
])
def test_bad_input_is_a_400(http, body, param) -> None:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_bad_input_through_the_sdk(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body={"min_tokens": 5})
    assert info.value.body["param"] == "min_tokens"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).choices  # the server is fine


def test_special_tokens_in_text(http, tokenizer) -> None:
    """The EOS that ends a request is part of its text only with include_stop_str_in_output (as in vLLM)."""
    eos = tokenizer.eos_token_id
    body = {"prompt": PROMPT, "max_tokens": 5, "min_tokens": 2, "logit_bias": {str(eos): 100},
            "skip_special_tokens": False, "include_stop_str_in_output": True}
    spaced = complete(http, **body)["choices"][0]["text"]
    tight = complete(http, **body, spaces_between_special_tokens=False)["choices"][0]["text"]
    skipped = complete(http, **{**body, "skip_special_tokens": True})["choices"][0]["text"]
    assert tight == skipped + "</s>"
    assert spaced == (skipped + "</s>" if skipped.endswith(" ") else skipped + " </s>")

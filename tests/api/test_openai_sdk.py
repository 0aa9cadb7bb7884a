"""The live server driven by the official ``openai`` SDK: completions, chat, streaming, sampling options."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest
import torch

from tests.support.live_server import SERVED_NAME, greedy_reference

MODEL = SERVED_NAME
PROMPTS = [
    "Hello, world! How are you today?",
    "The quick brown fox",
    "def main(argv):",
    "Once upon a time there was a little llama",
    "import os\nimport sys\n",
    "I love reading books",
]


@pytest.fixture(scope="module")
def references(engine_checkpoint, tokenizer):
    hf = engine_checkpoint[1]
    return {p: greedy_reference(hf, tokenizer, tokenizer.encode(p), 12) for p in PROMPTS}


def test_completion_shape_and_usage(client, tokenizer) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == MODEL
    (choice,) = result.choices
    assert choice.index == 0 and choice.finish_reason in ("length", "stop") and choice.logprobs is None
    assert result.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    assert 1 <= result.usage.completion_tokens <= 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_completion_equals_transformers(client, references, prompt) -> None:
    ref = references[prompt]
    if ref.max_tokens == 0:
        pytest.skip("near-tie at the first step")
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=ref.max_tokens, temperature=0)
    assert result.choices[0].text == ref.text


def test_greedy_token_prompt_equals_string_prompt(client, tokenizer, references) -> None:
    ref = references[PROMPTS[1]]
    ids = tokenizer.encode(PROMPTS[1])
    result = client.completions.create(model=MODEL, prompt=ids, max_tokens=ref.max_tokens, temperature=0)
    assert result.choices[0].text == ref.text


def test_greedy_chat_equals_transformers(client, engine_checkpoint, tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = tokenizer.apply_chat_template(messages)
    ref = greedy_reference(engine_checkpoint[1], tokenizer, ids, 10)
    assert ref.max_tokens > 0
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=ref.max_tokens,
                                            temperature=0)
    assert result.id.startswith("chatcmpl-") and result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == ref.text
    assert result.usage.prompt_tokens == len(ids)


def test_chat_content_parts_equal_string_content(client) -> None:
    kwargs = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    plain = client.chat.completions.create(messages=[{"role": "user", "content": "Hi you"}], **kwargs)
    parts = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]
    split = client.chat.completions.create(messages=[{"role": "user", "content": parts}], **kwargs)
    assert split.choices[0].message.content == plain.choices[0].message.content


def test_streamed_completion_equals_whole(client) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_streamed_chat_equals_whole_with_role_first(client) -> None:
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 10,
              "temperature": 0}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert content == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])


def test_n2_sampling_and_greedy(client) -> None:
    sampled = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, n=2, temperature=1.0,
                                        seed=7)
    assert [c.index for c in sampled.choices] == [0, 1]
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, n=2, temperature=0)
    assert greedy.choices[0].text == greedy.choices[1].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, temperature=1.0, seed=3)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_seed_reproducible(client) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 10, "temperature": 1.0, "top_p": 0.95}
    first = client.completions.create(seed=1234, **kwargs).choices[0].text
    assert client.completions.create(seed=1234, **kwargs).choices[0].text == first
    streamed = "".join(c.choices[0].text for c in client.completions.create(seed=1234, stream=True, **kwargs))
    assert streamed == first


def test_completion_logprobs(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3,
                                       extra_body={"ignore_eos": True})
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4 and token in top
        assert value <= 0 and value == max(top.values())  # greedy picks the most likely token


def test_echo_logprobs_match_transformers(client, engine_checkpoint, tokenizer) -> None:
    """lm-eval's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1, temperature 0."""
    ids = tokenizer.encode(PROMPTS[5])
    result = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=1,
                                       temperature=0)
    choice = result.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(tokenizer.decode(ids))
    with torch.no_grad():
        logits = engine_checkpoint[1](torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), expected, atol=1e-4)
    for value, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= max(top.values()) + 1e-6


def test_echo_without_logprobs(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[1], echo=True, max_tokens=3, temperature=0)
    assert result.choices[0].text.startswith(PROMPTS[1])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[1], echo=True, max_tokens=3, temperature=0, stream=True))
    assert streamed == result.choices[0].text


def test_chat_logprobs_format(client) -> None:
    result = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert 1 <= len(content) <= 5
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == entry.logprob and entry.top_logprobs[0].token == entry.token
    text = result.choices[0].message.content
    if result.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == text
    streamed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                              stream=True)
    tokens = [e.token for c in streamed for e in ((c.choices[0].logprobs.content or []) if c.choices and
                                                  c.choices[0].logprobs else [])]
    assert tokens == [e.token for e in content]


def test_stop_string_is_cut(client, references) -> None:
    prompt = max(PROMPTS, key=lambda p: len(references[p].text))
    ref = references[prompt]
    assert len(ref.text) >= 6
    stop = ref.text[3:6]
    result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=ref.max_tokens, temperature=0,
                                       stop=[stop, "\u2603never"])
    assert result.choices[0].text == ref.text[: ref.text.index(stop)]
    assert result.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=ref.max_tokens,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == result.choices[0].text


def test_best_of_returns_most_likely_sample(client) -> None:
    kwargs = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 99}
    all_three = client.completions.create(n=3, logprobs=0, **kwargs)
    best = max(all_three.choices, key=lambda c: sum(c.logprobs.token_logprobs))
    result = client.completions.create(n=1, best_of=3, **kwargs)
    (choice,) = result.choices
    assert choice.text == best.text and choice.logprobs is None
    assert result.usage.completion_tokens == all_three.usage.completion_tokens


def test_several_prompts_number_choices(client, references) -> None:
    prompts = PROMPTS[:2]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2, temperature=0)
    assert [c.index for c in sorted(result.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in result.choices}
    for p, prompt in enumerate(prompts):
        single = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
        assert by_index[2 * p] == by_index[2 * p + 1] == single.choices[0].text


def test_models(client, api_server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_64_concurrent_streams_match_one_at_a_time(api_server, client, engine_checkpoint, tokenizer) -> None:
    hf = engine_checkpoint[1]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(64)]
    refs = [greedy_reference(hf, tokenizer, tokenizer.encode(p), 8) for p in prompts]
    cases = [(p, r) for p, r in zip(prompts, refs) if r.max_tokens > 0]  # no greedy near-ties
    assert len(cases) >= 48

    async def run_all() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=120)

        async def one(prompt: str, max_tokens: int) -> str:
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                      temperature=0, stream=True)
            return "".join([chunk.choices[0].text async for chunk in stream])

        try:
            return await asyncio.gather(*(one(p, r.max_tokens) for p, r in cases))
        finally:
            await aclient.close()

    texts = asyncio.run(run_all())
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=r.max_tokens, temperature=0)
             .choices[0].text for p, r in cases]
    assert texts == alone
    # NOTE: the engine's detokenizer and tokenizer.decode disagree on runs of byte tokens holding an invalid
    # byte (U+FFFD); compare with transformers where that does not occur.
    for text, (_, ref) in zip(texts, cases):
        if "\ufffd" not in ref.text:
            assert text == ref.text
    stats = api_server.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0 and not math.isnan(stats.kv_cache_usage)


def test_echo_text_offsets_point_into_the_returned_text(client) -> None:
    result = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=1,
                                       echo=True, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp.tokens[0] == "<s>" and lp.text_offset[0] == 0 and lp.text_offset[1] == 0  # <s> takes no room
    assert choice.text.startswith(PROMPTS[0])
    first = lp.tokens[1].lstrip(" ")  # the text drops the sentencepiece space of its first token
    assert choice.text[: len(first)] == first and lp.text_offset[2] == len(first)
    for token, offset in zip(lp.tokens[2:], lp.text_offset[2:]):
        assert choice.text[offset : offset + len(token)] == token, (token, offset)

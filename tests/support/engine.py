"""Shared helpers for engine tests: transformers references, a loop that drives an LLMEngine, bare requests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.engine.llm_engine import LLMEngine
from server.engine.request import Request, RequestOutput
from server.engine.sampling_params import SamplingParams


def hf_greedy(hf, prompt: list[int], max_new: int) -> tuple[list[int], int]:
    """transformers' greedy continuation and how many of its tokens are not decided by a near-tie."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    gaps = [(s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in out.scores]
    trusted = next((i for i, gap in enumerate(gaps) if gap < 1e-4), max_new)
    return tokens, trusted


def run_engine(
    engine: LLMEngine, arrivals: dict[int, Callable[[], None]] | None = None, max_steps: int = 20_000
) -> dict[tuple[str, int], list[RequestOutput]]:
    """Step until idle; ``arrivals[k]()`` runs before step ``k`` (requests arriving mid-flight)."""
    pending = dict(arrivals or {})
    outputs: dict[tuple[str, int], list[RequestOutput]] = {}
    for step in range(max_steps):
        if step in pending:
            pending.pop(step)()
        if not engine.has_unfinished() and not pending:
            return outputs
        for out in engine.step():
            outputs.setdefault((out.request_id, out.index), []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(deltas: list[RequestOutput]) -> list[int]:
    return [t for d in deltas for t in d.new_token_ids]


def make_request(tokens: list[int], rid: str = "r", index: int = 0, **params: object) -> Request:
    """A bare engine ``Request`` for scheduler and block-manager tests (no tokenizer behind it)."""
    return Request(rid, index, list(tokens), SamplingParams(**params))


def assert_matches(outputs, requests) -> None:
    """Each request ``(id, prompt, max_tokens, expected, trusted)`` got ``max_tokens`` tokens ending on length,
    the first ``trusted`` equal to ``expected``; near-ties cut at most a fifth of the tokens."""
    assert len(outputs) == len(requests)
    for rid, _, max_tokens, expected, trusted in requests:
        deltas = outputs[(rid, 0)]
        got = tokens_of(deltas)
        assert len(got) == max_tokens and deltas[-1].finish_reason == "length"
        assert got[:trusted] == expected[:trusted], rid
    assert sum(t for *_, t in requests) > 0.8 * sum(m for _, _, m, _, _ in requests), "too many near-ties"


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting

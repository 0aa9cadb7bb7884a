"""The checks a request passes once, at the front door, before any engine sees it."""

from __future__ import annotations

from collections.abc import Sequence

from model.tokenizer import Tokenizer
from server.engine.logit_masks import bad_words_token_ids
from server.engine.sampling_params import SamplingParams, SamplingParamsError


class RequestRejected(ValueError):
    """A request that can never be served as asked (the API answers 400)."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def validate_request(prompt_ids: Sequence[int], params: SamplingParams, tokenizer: Tokenizer, vocab_size: int,
                     max_model_len: int) -> None:
    """Raise ``RequestRejected``/``SamplingParamsError`` for a request that cannot be served."""
    if not prompt_ids:
        raise RequestRejected("the prompt is empty", param="prompt")
    if any(not 0 <= t < vocab_size for t in prompt_ids):
        raise RequestRejected(f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    params.validate_vocab(vocab_size)
    for sequence in bad_words_token_ids(tokenizer, params.bad_words):
        if any(t >= vocab_size for t in sequence):
            raise SamplingParamsError(f"bad_words tokenize to ids beyond the vocabulary of {vocab_size}", "bad_words")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{total} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens} for the completion). "
            "Please reduce the prompt or max_tokens.",
            code="context_length_exceeded",
            param="max_tokens",
        )

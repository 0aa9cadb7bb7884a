"""Request fields -> ``SamplingParams`` (the engine validates values and names the field at fault)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from server.api.errors import APIError
from server.api.schemas import SamplingFields
from server.engine.sampling_params import SamplingParams

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed")
_TOKEN_KEY = re.compile("[0-9]+", re.ASCII)


def sampling_params(body: SamplingFields, defaults: Mapping[str, Any], **fields: Any) -> SamplingParams:
    """Sampling parameters from the shared request fields; ``fields`` adds the endpoint-specific ones.

    ``defaults`` (from the checkpoint's generation config) fill the optional fields the request leaves out.
    """
    values = {name: defaults[name] for name in _OPTIONAL if name in defaults}
    values.update({name: value for name in _OPTIONAL if (value := getattr(body, name)) is not None})
    for key in body.logit_bias or {}:
        if not _TOKEN_KEY.fullmatch(key) or len(key) > 12:  # int() also takes " 5", "+5", "5_0" or "٥"
            raise APIError(400, f"logit_bias keys must be token ids in decimal, got {key[:20]!r}",
                           param="logit_bias")
    return SamplingParams(
        stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        logit_bias=tuple((int(k), v) for k, v in (body.logit_bias or {}).items()),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
        min_tokens=body.min_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        allowed_token_ids=None if body.allowed_token_ids is None else tuple(body.allowed_token_ids),
        bad_words=tuple(body.bad_words or ()),
        **values,
        **fields,
    )


def truncate_prompt(ids: Sequence[int], body: SamplingFields, max_model_len: int) -> list[int]:
    """The last ``truncate_prompt_tokens`` ids (-1: ``max_model_len``) of a prompt."""
    keep = body.truncate_prompt_tokens
    if keep is None:
        return list(ids)
    if keep == 0 or keep < -1:
        raise APIError(400, f"truncate_prompt_tokens must be -1 or at least 1, got {keep}",
                       param="truncate_prompt_tokens")
    keep = max_model_len if keep == -1 else keep
    return list(ids[-keep:])

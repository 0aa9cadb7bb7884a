"""Request fields -> ``SamplingParams`` (the engine validates values and names the field at fault)."""

from __future__ import annotations

import re
from typing import Any

from server.api.errors import APIError
from server.api.schemas import SamplingFields
from server.engine.sampling_params import SamplingParams

_OPTIONAL = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed")
_TOKEN_KEY = re.compile("[0-9]+", re.ASCII)


def sampling_params(body: SamplingFields, **fields: Any) -> SamplingParams:
    """Sampling parameters from the shared request fields; ``fields`` adds the endpoint-specific ones."""
    values = {name: value for name in _OPTIONAL if (value := getattr(body, name)) is not None}
    for key in body.logit_bias or {}:
        if not _TOKEN_KEY.fullmatch(key) or len(key) > 12:  # int() also takes " 5", "+5", "5_0" or "٥"
            raise APIError(400, f"logit_bias keys must be token ids in decimal, got {key[:20]!r}",
                           param="logit_bias")
    return SamplingParams(
        stop=body.stop or (),
        stop_token_ids=body.stop_token_ids or (),
        logit_bias=body.logit_bias or (),
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
        **values,
        **fields,
    )

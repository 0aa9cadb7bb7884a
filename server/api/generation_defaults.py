"""Sampling defaults from the checkpoint's ``generation_config.json``, as vLLM's ``--generation-config auto``.

The fields a request leaves out take the values the model's authors recommend (only those that differ from
transformers' own defaults): temperature, top_p, top_k, min_p, repetition_penalty, and ``max_new_tokens`` as
the default ``max_tokens``. ``--generation-config none`` turns it off; a directory reads that directory's file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.engine.sampling_params import SamplingParams, SamplingParamsError

logger = logging.getLogger(__name__)

OFF = ("none", "vllm")
# generation_config.json key -> request field
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def load_generation_defaults(source: str, model_dir: str | Path) -> dict[str, Any]:
    """Request-field defaults from ``source`` ("auto": the checkpoint, "none": nothing, else a directory)."""
    if source.lower() in OFF:
        return {}
    directory = Path(model_dir if source.lower() == "auto" else source)
    if not (directory / "generation_config.json").is_file():
        if source.lower() != "auto":
            raise ValueError(f"no generation_config.json in {str(directory)!r}")
        return {}
    from transformers import GenerationConfig  # transformers is slow to import: only when there is a file

    diff = GenerationConfig.from_pretrained(str(directory), local_files_only=True).to_diff_dict()
    defaults = {field: diff[key] for key, field in _FIELDS.items() if diff.get(key) is not None}
    sampling = {k: v for k, v in defaults.items() if k != "max_tokens"}
    try:
        SamplingParams(max_tokens=defaults.get("max_tokens", 16), **sampling)
    except SamplingParamsError as exc:
        raise ValueError(f"generation_config.json in {str(directory)!r}: {exc.message}") from exc
    return defaults


def describe(defaults: dict[str, Any]) -> str:
    if not defaults:
        return "no sampling defaults from generation_config.json"
    return "sampling defaults from generation_config.json: " + ", ".join(f"{k}={v}" for k, v in defaults.items())

"""``GET /tokenizer_info``: the tokenizer's configuration as vLLM reports it.

The tokenizer's init arguments (file paths dropped, added tokens as their content), ``tokenizer_class``, the
special tokens (``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``, null when the tokenizer has none)
and the chat template in force.
"""

from __future__ import annotations

from typing import Any

from model.tokenizer import Tokenizer

_DROPPED = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")
_SPECIAL = ("bos_token", "eos_token", "pad_token", "unk_token")


def _json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if hasattr(value, "content"):  # an AddedToken
        return value.content
    if value is None or isinstance(value, (bool, str, int, float)):
        return value
    return str(value)


def tokenizer_info(tokenizer: Tokenizer, chat_template: str) -> dict[str, Any]:
    """The JSON object ``/tokenizer_info`` answers."""
    hf = tokenizer.hf
    info = {k: _json_value(v) for k, v in dict(getattr(hf, "init_kwargs", None) or {}).items() if k not in _DROPPED}
    for name in _SPECIAL:
        info[name] = _json_value(getattr(hf, name, None))
    info["tokenizer_class"] = type(hf).__name__
    info["chat_template"] = chat_template
    return info

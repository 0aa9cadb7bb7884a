"""Runtime tokenizer: a thin, typed wrapper around a Hugging Face tokenizer plus JetMoe's chat template.

Chat prompts: the template renders the *whole* prompt text, including the leading BOS (`{{ bos_token }}`),
and the rendered text is then encoded with `add_special_tokens=False`, so BOS is never doubled. This is also
what `transformers`' own `apply_chat_template(tokenize=True)` does; a checkpoint template that does not
emit `bos_token` therefore yields a prompt without BOS, exactly as with `transformers`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from model.chat_encoding import ProtectedEncoder, encode_chat

# JetMoe chat format (Zephyr-style text markers): for every message `<|role|>\n{content}</s>\n`, then
# `<|assistant|>\n` when a generation prompt is asked for. Any role name is rendered as `<|role|>`.
JETMOE_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer.model")
_MIN_VOCAB = 16  # guards against transformers silently building a 3-token tokenizer


class TokenizerLoadError(RuntimeError):
    """Raised when no usable tokenizer can be loaded from a checkpoint directory."""


def _content_text(content: Any) -> str:
    """Message content as text: a string, None, or a list of OpenAI-style `{"type": "text"}` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content)
    return str(content)


class Tokenizer:
    """Encode/decode and chat-template rendering over a Hugging Face (fast) tokenizer."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (or a sentencepiece `tokenizer.model`) from a local checkpoint directory."""
        directory = Path(path)
        if not any((directory / name).is_file() for name in TOKENIZER_FILES):
            raise TokenizerLoadError(f"no tokenizer.json or tokenizer.model in {str(directory)!r}")
        try:
            hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds (OSError, ValueError, ImportError...)
            raise TokenizerLoadError(f"cannot load the tokenizer in {str(directory)!r}: {exc}") from exc
        if len(hf) < _MIN_VOCAB:
            raise TokenizerLoadError(f"tokenizer in {str(directory)!r} has only {len(hf)} tokens")
        return cls(hf)

    @property
    def hf(self) -> Any:
        """The underlying transformers tokenizer."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._hf.eos_token_id

    @functools.cached_property
    def longest_piece_chars(self) -> int:
        """The most characters one token can stand for (added tokens included, at least 1)."""
        pieces = [p for p in self._hf.get_vocab() if p]
        pieces += [str(t) for t in getattr(self._hf, "all_special_tokens", [])]
        return max([1, *(len(p) for p in pieces)])

    @property
    def all_special_ids(self) -> list[int]:
        return list(self._hf.all_special_ids)

    @property
    def chat_template(self) -> str:
        """The checkpoint's chat template when it has one, else `JETMOE_CHAT_TEMPLATE`."""
        template = getattr(self._hf, "chat_template", None)
        if isinstance(template, Mapping):  # several named templates: use the default one
            template = template.get("default")
        return template or JETMOE_CHAT_TEMPLATE

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens` BOS is prepended (Llama style)."""
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Tokenization-space clean-up is off, so decoding is local (safe to do incrementally)."""
        return self._hf.decode(
            list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary pieces of `ids` (e.g. `▁Hello`, `<0xF0>`); "" for ids the tokenizer does not know.

        A checkpoint's embedding is often padded beyond its tokenizer, so the model can emit such ids.
        """
        return [piece or "" for piece in self._hf.convert_ids_to_tokens(list(ids))]

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat prompt as text (BOS included when the template emits it).

        ``chat_template`` replaces the checkpoint's; ``continue_final_message`` ends the text with the last
        message's content (no end-of-turn after it); ``template_kwargs`` are more template variables.
        """
        normalized = [{**m, "content": _content_text(m.get("content"))} for m in messages]
        return self._hf.apply_chat_template(
            normalized,
            chat_template=chat_template or self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **dict(template_kwargs or {}),
        )

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
        special_tokens_in_content: bool = False, **options: Any,
    ) -> list[int]:
        """Token ids of the rendered chat prompt. Special tokens come from the template only: the same text in a
        message's content is tokenized as text (``model.chat_encoding``), unless ``special_tokens_in_content``.
        """
        def render(msgs: Sequence[Mapping[str, Any]]) -> str:
            return self.render_chat(msgs, add_generation_prompt, **options)

        def plain(text: str) -> list[int]:
            return self.encode(text, add_special_tokens=False)

        if special_tokens_in_content:
            return plain(render(messages))
        contents = [_content_text(m.get("content")) for m in messages]
        return encode_chat(render, messages, contents, self.special_tokens, lambda: self.protected_encoder, plain)

    @functools.cached_property
    def special_tokens(self) -> dict[str, int]:
        """The text of every special token, with its id."""
        tokens = [str(t) for t in self._hf.all_special_tokens]
        return {t: self._hf.convert_tokens_to_ids(t) for t in tokens if t}

    @functools.cached_property
    def protected_encoder(self) -> ProtectedEncoder:
        return ProtectedEncoder(self._hf.backend_tokenizer)

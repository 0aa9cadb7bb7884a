"""Tests for the trained Llama-style tokenizer and the runtime `Tokenizer` wrapper."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from model.tokenizer import JETMOE_CHAT_TEMPLATE, Tokenizer, TokenizerLoadError
from tests.conftest import TOKENIZER_VOCAB_SIZE
from tools.train_tiny.tokenizer import BYTE_TOKENS

ROUND_TRIP_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I love 🦙 and 日本語!",
    "日本語のテキストと中文文本",
    "Emoji 😀👍🏽🎉 in a row",
    "def add(a, b):\n    return a + b\n\n\tindented\n",
    "tabs\tand  double  spaces, punctuation?!",
]


def _copy_without_template(src: Path, dst: Path, config_template: str | None = None) -> Path:
    """A checkpoint dir with only tokenizer.json and a tokenizer_config.json (optionally with a template)."""
    dst.mkdir()
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    if config_template is not None:
        config["chat_template"] = config_template
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    return dst


def test_special_and_byte_token_ids(llama_tokenizer: Tokenizer) -> None:
    assert llama_tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert llama_tokenizer.convert_ids_to_tokens(list(range(3, 259))) == list(BYTE_TOKENS)
    assert BYTE_TOKENS[0] == "<0x00>" and BYTE_TOKENS[-1] == "<0xFF>"
    assert llama_tokenizer.bos_token_id == 1
    assert llama_tokenizer.eos_token_id == 2
    assert set(llama_tokenizer.all_special_ids) == {0, 1, 2}
    assert llama_tokenizer.vocab_size == TOKENIZER_VOCAB_SIZE


def test_encode_prepends_bos(llama_tokenizer: Tokenizer) -> None:
    ids = llama_tokenizer.encode("Hello world")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert llama_tokenizer.encode("Hello world", add_special_tokens=False) == ids[1:]
    pieces = llama_tokenizer.convert_ids_to_tokens(ids[1:])
    assert pieces[0] == "▁Hello" and "".join(pieces) == "▁Hello▁world"  # sentencepiece-style spaces


def test_saved_dir_loads_with_auto_tokenizer(llama_tokenizer_dir: Path, llama_tokenizer: Tokenizer) -> None:
    assert (llama_tokenizer_dir / "tokenizer.json").is_file()
    assert (llama_tokenizer_dir / "tokenizer_config.json").is_file()
    hf = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    assert len(hf) == TOKENIZER_VOCAB_SIZE
    text = "I love 🦙 and 日本語!"
    assert hf.encode(text) == llama_tokenizer.encode(text)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(llama_tokenizer: Tokenizer, text: str) -> None:
    ids = llama_tokenizer.encode(text)
    assert llama_tokenizer.decode(ids) == text
    assert llama_tokenizer.decode(ids, skip_special_tokens=False) == "<s> " + text


def test_emoji_and_cjk_use_byte_fallback(llama_tokenizer: Tokenizer) -> None:
    pieces = llama_tokenizer.convert_ids_to_tokens(llama_tokenizer.encode("🦙日", add_special_tokens=False))
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "<0xE6>", "<0x97>", "<0xA5>"]
    assert 0 not in llama_tokenizer.encode("🦙 and 日本語")  # never <unk>


def test_chat_template_renders_jetmoe_format(llama_tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hello!"},
    ]
    expected = "<s><|system|>\nYou are a helpful assistant.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n"
    assert llama_tokenizer.render_chat(messages) == expected
    ids = llama_tokenizer.apply_chat_template(messages)
    assert ids == llama_tokenizer.encode(expected, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(1) == 1  # exactly one BOS
    assert ids.count(2) == 2  # the literal </s> markers are EOS tokens
    without_prompt = llama_tokenizer.render_chat(messages, add_generation_prompt=False)
    assert without_prompt == expected.removesuffix("<|assistant|>\n")


def test_chat_template_accepts_content_parts(llama_tokenizer: Tokenizer) -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]
    assert llama_tokenizer.apply_chat_template([{"role": "user", "content": parts}]) == (
        llama_tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])
    )


def test_missing_template_falls_back_to_jetmoe(llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(_copy_without_template(llama_tokenizer_dir, tmp_path / "plain"))
    assert tok.chat_template == JETMOE_CHAT_TEMPLATE
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "<s><|user|>\nHi</s>\n<|assistant|>\n"


def test_checkpoint_template_is_used(llama_tokenizer_dir: Path, tmp_path: Path) -> None:
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = Tokenizer.from_dir(_copy_without_template(llama_tokenizer_dir, tmp_path / "custom", custom))
    assert tok.chat_template == custom
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "[user] Hi\n"


def test_directory_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError, match=re.escape(str(tmp_path))):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerLoadError, match=re.escape(str(tmp_path))):
        Tokenizer.from_dir(tmp_path)

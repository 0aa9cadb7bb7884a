"""Property test of the detokenizer against its rule, over random token sequences of byte-fallback tokenizers.

The rule: the concatenation of every released delta equals the output tokens' bytes (a byte-fallback token
its byte, any other piece its UTF-8 with the space marker as a space; skipped special tokens nothing) decoded
with ``errors="replace"``, the dummy-prefix space stripped only when the prompt shows no text. With a stop
string, the text ends right before (or, with ``include_stop_str_in_output``, right after) its first
occurrence. The reference below is written from the vocabulary pieces, independently of the detokenizer.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.bundled import BUNDLED_MODEL_DIR
from model.tokenizer import Tokenizer
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.token_bytes import TokenBytes

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_TEXTS = ["日本語", "🦙", "😀👍🏽", "über naïve", "  x = 1\n", "\t\n\n", "中文文本", "é", "def f():", " the fox"]


@pytest.fixture(scope="module")
def bundled_tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(BUNDLED_MODEL_DIR)


def _reference(tok: Tokenizer, prompt: list[int], output: list[int]) -> str:
    special = set(tok.all_special_ids)
    data = bytearray()
    for piece, token in zip(tok.convert_ids_to_tokens(output), output):
        if token in special:
            continue
        match = _BYTE.fullmatch(piece)
        data += bytes([int(match.group(1), 16)]) if match else piece.replace("\u2581", " ").encode("utf-8")
    text = data.decode("utf-8", errors="replace")
    prompt_shows_text = tok.decode(prompt) != ""
    return text if prompt_shows_text or not text.startswith(" ") else text[1:]


@st.composite
def token_sequences(draw: st.DrawFn, tok: Tokenizer) -> list[int]:
    """Mixes of raw byte tokens (valid and invalid UTF-8 runs), encoded texts, any id and special ids."""
    byte_ids = tok.hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])
    vocab = tok.vocab_size
    part = st.one_of(
        st.lists(st.sampled_from(byte_ids), min_size=1, max_size=6),
        st.binary(min_size=1, max_size=6).map(lambda b: [byte_ids[x] for x in b]),
        st.sampled_from(_TEXTS).map(lambda t: tok.encode(t, add_special_tokens=False)),
        st.sampled_from(_TEXTS).map(lambda t: [byte_ids[x] for x in t.encode("utf-8")]),
        st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),
        st.sampled_from(tok.all_special_ids).map(lambda i: [i]),
    )
    return [t for chunk in draw(st.lists(part, min_size=1, max_size=10)) for t in chunk]


def _run(tok: Tokenizer, prompt: list[int], output: list[int], chunks: list[int], **kwargs: object) -> tuple[str, bool]:
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)  # type: ignore[arg-type]
    text, stopped, i = "", False, 0
    for size in chunks:
        if i >= len(output):
            break
        step = detok.add_tokens(output[i : i + size])
        text += step.text
        i += size
        stopped = step.stopped
        if stopped:
            break
    while not stopped and i < len(output):
        step = detok.add_tokens(output[i : i + 1])
        text, stopped, i = text + step.text, step.stopped, i + 1
    if not stopped:
        text += detok.flush()  # a stop string can still complete here: a split character forced out as U+FFFD
        stopped = detok.stopped
    assert detok.output_text == text
    return text, stopped


PROMPTS = ["The quick brown", "日本", "x"]
# The same examples every run; for a deeper or different search: DETOKENIZER_EXAMPLES=5000 DETOKENIZER_RANDOM=1
_settings = settings(max_examples=int(os.environ.get("DETOKENIZER_EXAMPLES", "150")), deadline=None,
                     derandomize=not os.environ.get("DETOKENIZER_RANDOM"),
                     suppress_health_check=[HealthCheck.too_slow])


def _check(tok: Tokenizer, data: st.DataObject) -> None:
    prompt_text = data.draw(st.sampled_from(PROMPTS + [""]))
    prompt = tok.encode(prompt_text) if prompt_text else [tok.bos_token_id]
    output = data.draw(token_sequences(tok))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(output)))
    expected = _reference(tok, prompt, output)
    text, stopped = _run(tok, prompt, output, chunks)
    assert text == expected and not stopped
    if "\ufffd" not in expected and all(t not in tok.all_special_ids for t in output):
        full, head = tok.decode(prompt + output), tok.decode(prompt)
        assert full[len(head):] == expected  # where decode() is right, the rule agrees with it
    if len(expected) >= 2:
        start = data.draw(st.integers(0, len(expected) - 2))
        stop = expected[start : start + data.draw(st.integers(1, min(4, len(expected) - start)))]
        cut = expected.find(stop)
        assert _run(tok, prompt, output, chunks, stop=[stop]) == (expected[:cut], True)
        with_stop = _run(tok, prompt, output, chunks, stop=[stop], include_stop_str_in_output=True)
        assert with_stop == (expected[: cut + len(stop)], True)


@given(data=st.data())
@_settings
def test_trained_tokenizer_streams_exactly_the_rule(llama_tokenizer: Tokenizer, data: st.DataObject) -> None:
    _check(llama_tokenizer, data)


@given(data=st.data())
@_settings
def test_bundled_tokenizer_streams_exactly_the_rule(bundled_tokenizer: Tokenizer, data: st.DataObject) -> None:
    _check(bundled_tokenizer, data)


def test_issue_examples(llama_tokenizer: Tokenizer) -> None:
    """``0xE6 0x54`` streams as a replacement character and a T; a newline after an invalid byte stays one."""
    tok = llama_tokenizer
    ids = tok.hf.convert_tokens_to_ids(["<0xE6>", "<0x54>", "<0xE6>", "<0x0A>"])
    prompt = tok.encode("Look")
    assert _run(tok, prompt, ids, [1] * 4) == ("\ufffdT\ufffd\n", False)


def test_token_bytes_read_the_decoder(llama_tokenizer: Tokenizer) -> None:
    table = TokenBytes(llama_tokenizer)
    assert (table.kind, table.strip_leading) == ("sentencepiece", 1)
    (fox,) = llama_tokenizer.encode("fox", add_special_tokens=False)
    assert table.of(fox) == b" fox" and table.of(llama_tokenizer.eos_token_id) == b"</s>"
    (byte,) = llama_tokenizer.hf.convert_tokens_to_ids(["<0xE6>"])
    assert table.of(byte) == b"\xe6" and table.of(llama_tokenizer.vocab_size + 3) == b""


def test_byte_level_bpe_streams_its_text() -> None:
    """A GPT-2 style byte-level tokenizer: each piece's characters stand for bytes."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    raw.train_from_iterator(["hello world", "the fox jumps", "日本語 text"] * 20, trainer)
    tok = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>"))
    assert TokenBytes(tok).kind == "byte_level"
    text = " héllo 🦙 wörld 日本\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert _run(tok, tok.encode("the", add_special_tokens=False), ids, [1] * len(ids)) == (text, False)

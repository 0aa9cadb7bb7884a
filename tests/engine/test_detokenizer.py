"""Tests for incremental detokenization and stop strings."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from model.tokenizer import Tokenizer
from server.engine.detokenizer import DetokenizerStep, IncrementalDetokenizer

SENTENCE = "The quick brown fox jumps over the lazy dog."
EMOJI_CJK = "I love 🦙 and 日本語! Emoji 😀👍🏽 中文文本 done"
CODE = "def add(a, b):\n    return a + b\n\n\nclass Foo:\n\tpass\n    # comment\n"
WORDS = ["the", "fox", "🦙", "日本語", "😀", "code", "\n", "    ", "\t", "x = 1", "!", "über", "naïve", "é"]


def _feed(detok: IncrementalDetokenizer, output_ids: Sequence[int], chunk: int = 1) -> list[DetokenizerStep]:
    return [detok.add_tokens(output_ids[i : i + chunk]) for i in range(0, len(output_ids), chunk)]


def _expected(tok: Tokenizer, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> str:
    """What a client must see: the text `output_ids` adds to the decoded prompt."""
    prompt_text = tok.decode(prompt_ids)
    full_text = tok.decode(list(prompt_ids) + list(output_ids))
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def _split_points(tok: Tokenizer, ids: Sequence[int]) -> list[int]:
    """Prompt lengths whose decoded prompt ends on a whole character (BOS-only prompt included)."""
    return [k for k in range(1, len(ids)) if not tok.decode(ids[:k]).endswith("\ufffd")]


def _check_stream(tok: Tokenizer, prompt_ids: list[int], output_ids: list[int], chunk: int = 1) -> None:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    steps = _feed(detok, output_ids, chunk)
    assert all("\ufffd" not in s.text and not s.stopped for s in steps)
    tail = detok.flush()
    assert "".join(s.text for s in steps) + tail == _expected(tok, prompt_ids, output_ids)
    assert detok.output_text == _expected(tok, prompt_ids, output_ids)


@pytest.mark.parametrize("text", [SENTENCE, EMOJI_CJK, CODE], ids=["words", "emoji_cjk", "code"])
def test_streamed_text_matches_full_decode(llama_tokenizer: Tokenizer, text: str) -> None:
    ids = llama_tokenizer.encode(text)
    for k in _split_points(llama_tokenizer, ids):
        _check_stream(llama_tokenizer, ids[:k], ids[k:])
        _check_stream(llama_tokenizer, ids[:k], ids[k:], chunk=3)


def test_leading_space_of_first_generated_token(llama_tokenizer: Tokenizer) -> None:
    prompt = llama_tokenizer.encode("The quick brown")
    output = llama_tokenizer.encode(" fox jumps", add_special_tokens=False)
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    assert detok.add_tokens(output[:1]).text == " fox"
    assert detok.add_tokens(output[1:]).text == " jumps"
    bos_only = IncrementalDetokenizer(llama_tokenizer, prompt[:1])
    assert bos_only.add_tokens(output).text == "fox jumps"  # text start: like decode(), no leading space


def test_split_character_is_held_until_complete(llama_tokenizer: Tokenizer) -> None:
    prompt = llama_tokenizer.encode("I love")
    output = llama_tokenizer.encode(" 🦙", add_special_tokens=False)
    pieces = llama_tokenizer.convert_ids_to_tokens(output)
    assert pieces == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    assert [s.text for s in _feed(detok, output)] == [" ", "", "", "", "🦙"]


@pytest.mark.parametrize("seed", range(8))
def test_random_mixed_text(llama_tokenizer: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(30))
    ids = llama_tokenizer.encode(text)
    k = rng.choice(_split_points(llama_tokenizer, ids))
    _check_stream(llama_tokenizer, ids[:k], ids[k:])


def test_special_tokens_are_skipped(llama_tokenizer: Tokenizer) -> None:
    prompt = llama_tokenizer.encode("The quick")
    output = llama_tokenizer.encode(" brown fox", add_special_tokens=False) + [llama_tokenizer.eos_token_id]
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    assert "".join(s.text for s in _feed(detok, output)) + detok.flush() == " brown fox"
    kept = IncrementalDetokenizer(llama_tokenizer, prompt, skip_special_tokens=False)
    assert "".join(s.text for s in _feed(kept, output)) + kept.flush() == " brown fox </s>"
    tight = IncrementalDetokenizer(llama_tokenizer, prompt, skip_special_tokens=False,
                                   spaces_between_special_tokens=False)
    assert "".join(s.text for s in _feed(tight, output)) + tight.flush() == " brown fox</s>"


def _run_with_stops(
    tok: Tokenizer, stops: Sequence[str], text: str = SENTENCE, prompt: str = "Look:"
) -> tuple[IncrementalDetokenizer, list[DetokenizerStep]]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), stop=stops)
    return detok, _feed(detok, tok.encode(" " + text, add_special_tokens=False))


def _stop_index(steps: Sequence[DetokenizerStep]) -> int:
    stopped = [i for i, s in enumerate(steps) if s.stopped]
    return stopped[0] if stopped else -1


def test_stop_string_across_tokens(llama_tokenizer: Tokenizer) -> None:
    detok, steps = _run_with_stops(llama_tokenizer, ["over the"])
    i = _stop_index(steps)
    assert i >= 0 and steps[i].stop_string == "over the"
    assert all(s.stopped and s.text == "" for s in steps[i + 1 :])
    assert "".join(s.text for s in steps) == " The quick brown fox jumps "
    assert detok.output_text == " The quick brown fox jumps "
    assert detok.flush() == ""


def test_stop_string_is_held_back_while_ambiguous(llama_tokenizer: Tokenizer) -> None:
    _, steps = _run_with_stops(llama_tokenizer, ["over the"])
    released = ""
    for step in steps:
        released += step.text
        assert "over" not in released


def test_partial_match_that_diverges_is_released(llama_tokenizer: Tokenizer) -> None:
    detok, steps = _run_with_stops(llama_tokenizer, ["over there", "lazy cat"])
    assert _stop_index(steps) == -1
    assert "".join(s.text for s in steps) + detok.flush() == " " + SENTENCE
    assert detok.output_text == " " + SENTENCE


def test_earliest_stop_string_wins(llama_tokenizer: Tokenizer) -> None:
    _, steps = _run_with_stops(llama_tokenizer, ["dog", "jumps"])
    assert steps[_stop_index(steps)].stop_string == "jumps"
    assert "".join(s.text for s in steps) == " The quick brown fox "
    detok = IncrementalDetokenizer(llama_tokenizer, llama_tokenizer.encode("Look:"), stop=["lazy", "over"])
    step = detok.add_tokens(llama_tokenizer.encode(" " + SENTENCE, add_special_tokens=False))
    assert step == DetokenizerStep(" The quick brown fox jumps ", True, "over")


def test_stop_string_inside_one_token_and_split_emoji(llama_tokenizer: Tokenizer) -> None:
    _, steps = _run_with_stops(llama_tokenizer, ["ump"])
    assert "".join(s.text for s in steps) == " The quick brown fox j"
    _, steps = _run_with_stops(llama_tokenizer, ["🦙"], text=EMOJI_CJK)
    assert steps[_stop_index(steps)].stop_string == "🦙"
    assert "".join(s.text for s in steps) == " I love "


def test_flush_releases_held_text(llama_tokenizer: Tokenizer) -> None:
    detok, steps = _run_with_stops(
        llama_tokenizer, ["lazy cat"], text="The quick brown fox jumps over the lazy"
    )
    released = "".join(s.text for s in steps)
    assert released == " The quick brown fox jumps over the "
    assert detok.flush() == "lazy"
    assert detok.output_text == " The quick brown fox jumps over the lazy"
    assert detok.flush() == ""


def test_invalid_bytes_are_released_and_valid_ones_kept(llama_tokenizer: Tokenizer) -> None:
    stray = llama_tokenizer.encode("🦙", add_special_tokens=False)[-1]  # a lone continuation byte
    assert llama_tokenizer.convert_ids_to_tokens([stray]) == ["<0x99>"]
    prompt = llama_tokenizer.encode("The quick")
    output = [stray] * 5 + llama_tokenizer.encode(" fox 日本!", add_special_tokens=False) + [stray]
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    steps = _feed(detok, output)
    assert [s.text for s in steps[:5]] == ["\ufffd"] * 5
    assert "".join(s.text for s in steps) + detok.flush() == "\ufffd" * 5 + " fox 日本!\ufffd"


def _byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    return tok.hf.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])


def test_valid_bytes_after_an_invalid_one_are_not_replaced(llama_tokenizer: Tokenizer) -> None:
    prompt = llama_tokenizer.encode("The quick")
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    steps = _feed(detok, _byte_ids(llama_tokenizer, b"\xe6T\xe6\n\xe6\x97\xa5"))
    assert [s.text for s in steps] == ["", "\ufffdT", "", "\ufffd\n", "", "", "日"]
    assert detok.flush() == ""
    assert llama_tokenizer.decode(_byte_ids(llama_tokenizer, b"\xe6T")) == "\ufffd\ufffd"  # what decode() gives


def test_ids_beyond_the_tokenizer_vocab_decode_to_nothing(llama_tokenizer: Tokenizer) -> None:
    """A model whose embedding is padded past the tokenizer can emit unknown ids; they must not crash."""
    beyond = llama_tokenizer.vocab_size + 7
    prompt = llama_tokenizer.encode("Hello") + [beyond]
    detok = IncrementalDetokenizer(llama_tokenizer, prompt)
    text = detok.add_tokens([beyond]).text + detok.add_tokens(llama_tokenizer.encode(" world", False)).text
    assert (text + detok.flush()).strip() == "world"

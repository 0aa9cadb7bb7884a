"""Train a small Llama-style (sentencepiece-like) tokenizer with the `tokenizers` library.

The result mirrors the layout of the Llama/JetMoe tokenizer: `<unk>`, `<s>`, `</s>` at ids 0, 1, 2, the 256
byte-fallback tokens `<0x00>`..`<0xFF>` at ids 3..258, then the learned BPE pieces. Spaces are encoded as
`▁` by a Metaspace pre-tokenizer, unknown characters fall back to their UTF-8 bytes, and `<s>` is prepended
by the post-processor. The saved directory loads with `AutoTokenizer.from_pretrained`.

(transformers 5's `LlamaTokenizer(vocab_file=...)` silently yields a 3-token tokenizer, so we build the
fast tokenizer directly.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RawTokenizer
from transformers import PreTrainedTokenizerFast

from model.tokenizer import JETMOE_CHAT_TEMPLATE

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
BYTE_TOKENS: tuple[str, ...] = tuple(f"<0x{b:02X}>" for b in range(256))
NUM_RESERVED = len(SPECIAL_TOKENS) + len(BYTE_TOKENS)  # 259: learned pieces start at this id
_MAX_ALPHABET = 1000


# After spaces become "▁": newline runs, then words with their leading "▁" run, then trailing "▁" runs. Keeping
# a run of spaces with the word that follows lets BPE learn indentation pieces ("▁▁▁▁") as sentencepiece does.
_PIECES = Regex(r"\n+|▁*[^▁\n]+|▁+")


def _metaspace() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            pre_tokenizers.Split(_PIECES, behavior="isolated"),
        ]
    )


def _train_bpe(texts: Iterable[str], num_learned: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a plain BPE on `texts`; return its vocab and merges (in merge order)."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = _metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=num_learned,
        limit_alphabet=min(_MAX_ALPHABET, max(num_learned // 2, 1)),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    bpe = json.loads(raw.to_str())["model"]
    # NOTE: tokenizers stores merges as ["a", "b"] pairs (>= 0.20) or as "a b" strings (older versions).
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in bpe["merges"]]
    return bpe["vocab"], merges


def _llama_vocab(learned: dict[str, int]) -> dict[str, int]:
    """Specials at 0..2, byte tokens at 3..258, then the learned pieces in their learned order."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for piece, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    return vocab


def build_llama_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> RawTokenizer:
    """Assemble a Llama-style `tokenizers.Tokenizer` from a full vocab (with specials and bytes) and merges."""
    tok = RawTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.pre_tokenizer = _metaspace()
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return tok


def train_llama_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    chat_template: str | None = None,
) -> Path:
    """Train a Llama-style BPE tokenizer on `texts` and save it (HF format) into `out_dir`.

    `vocab_size` is the target total size including the 3 special and 256 byte tokens; the learned part may
    come out smaller on a small corpus. `chat_template` defaults to `JETMOE_CHAT_TEMPLATE`.
    Returns the output directory, which holds `tokenizer.json` and `tokenizer_config.json`.
    """
    if vocab_size <= NUM_RESERVED:
        raise ValueError(f"vocab_size must exceed {NUM_RESERVED} (specials + byte tokens), got {vocab_size}")
    learned, merges = _train_bpe(texts, vocab_size - NUM_RESERVED)
    raw = build_llama_tokenizer(_llama_vocab(learned), merges)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat_template if chat_template is not None else JETMOE_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out

"""Shared pytest fixtures. Everything is built offline: nothing is downloaded from a model hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from model.tokenizer import Tokenizer
from model.tokenizer_train import train_llama_tokenizer

TOKENIZER_VOCAB_SIZE = 1500
_STDLIB_SOURCES = ("os.py", "json/__init__.py", "textwrap.py", "string.py", "shutil.py", "argparse.py")
_ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I love reading books and writing code in the morning.",
    "The model answered the question with a short and helpful reply.",
    "Once upon a time there was a little llama who lived in the mountains.",
)


def tokenizer_corpus() -> list[str]:
    """An offline training corpus: a few standard-library sources plus short English sentences."""
    stdlib = Path(os.__file__).parent
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_SOURCES]
    return texts + list(_ENGLISH) * 20


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding a small trained Llama-style tokenizer (tokenizer.json + tokenizer_config.json)."""
    out = tmp_path_factory.mktemp("llama_tokenizer")
    return train_llama_tokenizer(tokenizer_corpus(), TOKENIZER_VOCAB_SIZE, out)


@pytest.fixture(scope="session")
def llama_tokenizer(llama_tokenizer_dir: Path) -> Tokenizer:
    """The trained tokenizer loaded through `Tokenizer.from_dir`."""
    return Tokenizer.from_dir(llama_tokenizer_dir)


@pytest.fixture(scope="session")
def engine_checkpoint(tmp_path_factory: pytest.TempPathFactory, llama_tokenizer_dir: Path):
    """A random JetMoe checkpoint with the trained tokenizer: ``(directory, transformers model)``."""
    from tests.checkpoints import TinyShape, save_checkpoint

    out = tmp_path_factory.mktemp("engine_ckpt")
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    shape = TinyShape(vocab_size=tokenizer.vocab_size, num_hidden_layers=2)
    hf = save_checkpoint(shape, out, seed=3)
    tokenizer.hf.save_pretrained(out)
    return out, hf


@pytest.fixture(scope="module")
def api_server(engine_checkpoint):
    """A live OpenAI-compatible server on the tiny checkpoint, shared by one test module."""
    from tests.live_server import live_server

    with live_server(engine_checkpoint[0]) as server:
        yield server

"""Shared pytest fixtures. Everything is built offline: nothing is downloaded from a model hub."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.tokenizer import Tokenizer
from tests.support.tokenizers import tokenizer_corpus
from tools.train_tiny.tokenizer import train_llama_tokenizer

TOKENIZER_VOCAB_SIZE = 1500


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
    from tests.support.checkpoints import TinyShape, save_checkpoint

    out = tmp_path_factory.mktemp("engine_ckpt")
    tokenizer = Tokenizer.from_dir(llama_tokenizer_dir)
    shape = TinyShape(vocab_size=tokenizer.vocab_size, num_hidden_layers=2)
    hf = save_checkpoint(shape, out, seed=3)
    tokenizer.hf.save_pretrained(out)
    return out, hf


@pytest.fixture(scope="module")
def api_server(engine_checkpoint):
    """A live OpenAI-compatible server on the tiny checkpoint, shared by one test module."""
    from tests.support.live_server import live_server

    with live_server(engine_checkpoint[0]) as server:
        yield server

"""Clients of the module's shared live server (``api_server``, from tests/conftest.py)."""

from __future__ import annotations

import httpx
import openai
import pytest

from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def http(api_server):
    """Raw HTTP against the shared server."""
    with httpx.Client(base_url=api_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(api_server) -> openai.OpenAI:
    """The official SDK against the shared server (modules with another server define their own)."""
    return openai.OpenAI(base_url=api_server.base_url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(engine_checkpoint) -> Tokenizer:
    """The shared server's tokenizer."""
    return Tokenizer.from_dir(engine_checkpoint[0])

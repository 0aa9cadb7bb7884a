"""Clients of the module's shared live server (``api_server``, from tests/conftest.py), and a server that runs
both the bundled model and the random test checkpoint."""

from __future__ import annotations

import httpx
import openai
import pytest

from model.bundled import BUNDLED_MODEL_DIR
from model.tokenizer import Tokenizer
from tests.support.live_server import live_server


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


@pytest.fixture(scope="module", params=["bundled", "random"])
def model_server(request, engine_checkpoint):
    """A live server on the bundled model, then on the random test checkpoint (tests that must hold on both)."""
    model_dir = BUNDLED_MODEL_DIR if request.param == "bundled" else engine_checkpoint[0]
    with live_server(model_dir, max_model_len=1024) as live:
        yield live


@pytest.fixture(scope="module")
def model_client(model_server) -> openai.OpenAI:
    """The official SDK against ``model_server``."""
    return openai.OpenAI(base_url=model_server.base_url, api_key="unused", max_retries=0)

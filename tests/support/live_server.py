"""A real uvicorn server on an ephemeral port, run in a background thread, for API tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from server.api import ServerSettings, create_app
from server.api.state import AppState
from server.engine.async_engine import AsyncEngine
from server.engine.client import EngineClient
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.multiproc.client import MultiprocEngine

SERVED_NAME = "tiny-jetmoe"
ENGINE_DEFAULTS: dict[str, Any] = {
    "device": "cpu", "dtype": "float32", "block_size": 16, "num_kv_blocks": 256, "max_model_len": 512,
}


@dataclass
class LiveServer:
    app: FastAPI
    engine: EngineClient
    url: str

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as ``base_url``."""
        return f"{self.url}/v1"

    @property
    def state(self) -> AppState:
        return self.app.state.api


def start_engine(model_dir: str | Path, in_process: bool = False, **overrides: Any) -> EngineClient:
    """The server's engine: the core in its own process (as ``jetmoe-serve`` runs it), or with ``in_process``
    on a thread here, for tests that reach into the core (fault injection, the runner's tensors)."""
    config = EngineConfig(model=str(model_dir), **{**ENGINE_DEFAULTS, **overrides})
    engine: EngineClient
    if in_process:
        engine = AsyncEngine(LLMEngine.from_config(config))
    else:
        engine = MultiprocEngine(config, cpu_threads=1, log_level="warning")
    engine.start()
    return engine


def in_process_engine(server: LiveServer) -> LLMEngine:
    """The in-process engine of a server started with ``in_process=True``."""
    assert isinstance(server.engine, AsyncEngine), "start the server with in_process=True"
    return server.engine.engine


@contextmanager
def serve_app(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread; yields its URL and stops it (lifespan shutdown included)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextmanager
def live_server(model_dir: str | Path, settings: ServerSettings | None = None, in_process: bool = False,
                **engine_overrides: Any) -> Iterator[LiveServer]:
    """Engine + app + uvicorn on ``model_dir``; everything is shut down on exit."""
    engine = start_engine(model_dir, in_process, **engine_overrides)
    app = create_app(engine, settings or ServerSettings(served_model_name=SERVED_NAME))
    try:
        with serve_app(app) as url:
            yield LiveServer(app, engine, url)
    finally:
        engine.shutdown()


@dataclass(frozen=True)
class GreedyReference:
    """What transformers generates greedily: the text and how many tokens to ask for to get exactly it."""

    text: str
    max_tokens: int


def greedy_reference(hf: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int,
                     min_gap: float = 1e-3) -> GreedyReference:
    """``hf.generate(do_sample=False)``, cut before the first step whose top-2 logits are a near-tie.

    The text is what follows the prompt in ``decode(prompt + output)`` (leading space kept, EOS dropped).
    """
    import torch

    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    new = out.sequences[0, len(prompt_ids):].tolist()
    safe = 0
    for logits in out.logits[: len(new)]:
        top = logits[0].float().topk(2).values
        if (top[0] - top[1]).item() < min_gap:
            break
        safe += 1
    new = new[:safe]
    eos = tokenizer.eos_token_id
    visible = new[: new.index(eos)] if eos in new else new
    prompt_text = tokenizer.decode(prompt_ids)
    return GreedyReference(tokenizer.decode(prompt_ids + visible)[len(prompt_text):], len(new))

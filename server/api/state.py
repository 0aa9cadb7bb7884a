"""Per-app runtime state: the engine, settings, metrics, and the admission rules (draining, queue limit)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from server.api.errors import APIError, model_not_found
from server.api.generation_defaults import describe, load_generation_defaults
from server.api.logprobs import TokenTexts
from server.api.metrics import ServerMetrics
from server.api.settings import ServerSettings
from server.engine.client import EngineClient

logger = logging.getLogger(__name__)


class AppState:
    """Everything a route needs, stored on ``app.state.api`` (no module globals)."""

    def __init__(self, engine: EngineClient, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        cache_config = {
            "block_size": str(engine.config.block_size),
            "num_gpu_blocks": str(engine.num_kv_blocks),
            "enable_prefix_caching": str(engine.config.enable_prefix_caching),
        }
        self.metrics = ServerMetrics(engine, settings.served_model_name, settings.export_vllm_metrics, cache_config)
        self.texts = TokenTexts(self.engine.tokenizer)
        self.created = int(time.time())
        self.draining = False
        self.num_in_flight = 0  # generation requests being answered
        self.num_not_started = 0  # engine requests submitted that have not produced a token yet
        self.chat_template: str = settings.chat_template or self.engine.tokenizer.chat_template
        self.generation_defaults: dict[str, Any] = load_generation_defaults(
            settings.generation_config, self.engine.config.model)
        logger.info("%s", describe(self.generation_defaults))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise model_not_found(name)

    def check_accepting(self) -> None:
        """503 while draining or when the engine loop is dead."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        if not self.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")

    def admit(self, num_sequences: int, param: str) -> QueueSlots:
        """Reserve queue places for a request's sequences (prompts x ``n``/``best_of``): 400 when they can never
        fit under ``max_queued_requests`` (``param`` is named), 429 with ``Retry-After`` when they do not fit now.

        A sequence counts as waiting from its admission until its first token (the engine's own count lags
        behind submissions by up to one step). The check and the reservation happen together, with no await
        between them, so a burst of concurrent requests cannot all pass the check before any of them is counted.
        """
        limit = self.settings.max_queued_requests
        if limit is not None:
            if num_sequences > limit:
                raise APIError(400, f"The request asks for {num_sequences} sequences (prompts x n); the server "
                               f"queues at most {limit}.", param=param, code="too_many_sequences")
            queued = max(self.engine.stats().num_waiting, self.num_not_started)
            if queued + num_sequences > limit:
                raise APIError(429, f"The server is overloaded: {queued} sequences are waiting (limit {limit}). "
                               "Retry later.", code="queue_full", headers={"Retry-After": "1"})
        return QueueSlots(self, num_sequences)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation request is in flight; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True


class QueueSlots:
    """Queue places held by one request's engine calls: each is given back at the call's first token, at its
    end, or at the latest when the request's response is done (``release_all``, which is idempotent)."""

    def __init__(self, state: AppState, count: int) -> None:
        self._state = state
        self._held = count
        state.num_not_started += count

    def release(self, count: int = 1) -> None:
        count = min(count, self._held)
        self._held -= count
        self._state.num_not_started -= count

    def release_all(self) -> None:
        self.release(self._held)

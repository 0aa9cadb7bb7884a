"""Per-app runtime state: the engine, settings, metrics, and the admission rules (draining, queue limit)."""

from __future__ import annotations

import asyncio
import time

from server.api.errors import APIError, model_not_found
from server.api.logprobs import TokenTexts
from server.api.metrics import ServerMetrics
from server.api.settings import ServerSettings
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine


class AppState:
    """Everything a route needs, stored on ``app.state.api`` (no module globals)."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = ServerMetrics(engine)
        self.texts = TokenTexts(self.llm.tokenizer)
        self.created = int(time.time())
        self.draining = False
        self.num_in_flight = 0  # generation requests being answered
        self.num_not_started = 0  # engine requests submitted that have not produced a token yet

    @property
    def llm(self) -> LLMEngine:
        return self.engine.engine

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise model_not_found(name)

    def check_accepting(self) -> None:
        """503 while draining or when the engine loop is dead."""
        if self.draining:
            raise APIError(503, "The server is shutting down.", code="shutting_down")
        if not self.engine.is_alive:
            raise APIError(503, "The engine is not running.", code="engine_dead")

    def check_queue(self) -> None:
        """429 when ``max_queued_requests`` requests already wait for the engine.

        A request counts as waiting from its submission until its first token (the engine's own count lags
        behind submissions by up to one step).
        """
        limit = self.settings.max_queued_requests
        if limit is None:
            return
        queued = max(self.engine.stats().num_waiting, self.num_not_started)
        if queued >= limit:
            raise APIError(429, f"The server is overloaded: {queued} requests are waiting (limit {limit}). "
                           "Retry later.", code="queue_full")

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no generation request is in flight; False when ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

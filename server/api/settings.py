"""Settings of the HTTP layer, in one frozen place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    """What the API needs to know beyond the engine.

    ``max_queued_requests``: answer 429 once this many requests wait for the engine (None: no limit).
    ``drain_timeout``: on shutdown, seconds in-flight requests may take to finish before they are aborted.
    """

    served_model_name: str
    api_key: str | None = None
    max_queued_requests: int | None = None
    drain_timeout: float = 30.0
    owned_by: str = "jetmoe"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be positive, got {self.max_queued_requests}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.api_key == "":
            object.__setattr__(self, "api_key", None)

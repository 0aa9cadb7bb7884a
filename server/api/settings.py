"""Settings of the HTTP layer, in one frozen place."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """What the API needs to know beyond the engine.

    ``max_queued_requests``: answer 429 once this many sequences (prompts x ``n``/``best_of``) wait for the
    engine, 400 for a request with more sequences than that (None: no limit).
    ``drain_timeout``: on shutdown, seconds in-flight requests may take to finish before they are aborted.
    ``max_request_bytes``: answer 413 to request bodies larger than this.
    ``max_response_entries``: answer 400 to a request whose answer would hold more token entries than this
    (tokens x samples x (1 + logprob alternatives)): a small request must not produce a huge response.
    ``special_tokens_in_messages``: let special-token text in a chat message (``</s>``, ``<s>``) become those
    tokens, as a plain tokenizer would (off: only the chat template's own markers are special tokens).
    ``body_timeout``: answer 408 (and close) when a request body has not arrived this many seconds after its head.
    ``export_vllm_metrics``: export every metric under vLLM's ``vllm:`` names too (for LLM-aware routers).
    ``chat_template``: a Jinja template that replaces the checkpoint's (None: the checkpoint's).
    ``generation_config``: where request defaults come from: "auto" (the checkpoint's generation_config.json),
    "none", or a directory holding a generation_config.json.
    ``trust_request_chat_template``: accept a request's own ``chat_template`` (a template renders with no time
    limit, so an untrusted client could stall the server with one; off by default, as in vLLM).
    """

    served_model_name: str
    api_key: str | None = None
    max_queued_requests: int | None = None
    drain_timeout: float = 30.0
    owned_by: str = "jetmoe"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    export_vllm_metrics: bool = False
    chat_template: str | None = None
    generation_config: str = "auto"
    trust_request_chat_template: bool = False
    body_timeout: float = 30.0
    special_tokens_in_messages: bool = False
    max_response_entries: int = 2_000_000

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_queued_requests is not None and self.max_queued_requests < 1:
            raise ValueError(f"max_queued_requests must be positive, got {self.max_queued_requests}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_response_entries < 1:
            raise ValueError(f"max_response_entries must be positive, got {self.max_response_entries}")
        if self.body_timeout <= 0:
            raise ValueError(f"body_timeout must be positive, got {self.body_timeout}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.api_key == "":
            object.__setattr__(self, "api_key", None)

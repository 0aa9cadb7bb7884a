"""What the API layer sees of an engine: async streams plus the facts it validates requests against.

Two implementations: ``AsyncEngine`` (the core on a thread of this process) and ``MultiprocEngine`` (the core
in its own process, ``server.engine.multiproc``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig
from server.engine.core import EngineStats
from server.engine.output_processor import OutputProcessor
from server.engine.sampling_params import SamplingParams
from server.engine.streams import StreamingEngine
from server.engine.structured.compiler import GrammarCompiler
from server.engine.validation import validate_request


class EngineClient(StreamingEngine):
    """An engine the API can run requests on."""

    config: EngineConfig
    tokenizer: Tokenizer
    grammars: GrammarCompiler  # compiles (and so validates) output constraints at the front door
    output_processor: OutputProcessor

    @property
    @abstractmethod
    def max_model_len(self) -> int: ...

    @property
    @abstractmethod
    def num_kv_blocks(self) -> int: ...

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def describe(self) -> str:
        """Device and dtype of the weights, for the startup log."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Counters as of the last step."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine; requests still running fail with ``EngineDeadError``."""

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``RequestRejected``/``SamplingParamsError`` for a request that cannot be served."""
        validate_request(prompt_ids, params, self.tokenizer, self.vocab_size, self.max_model_len)

"""The in-process engine: ``add_request`` / ``step`` / ``abort`` over the engine core and the output processor.

For tests, benchmarks and library users. The server runs the same core in its own process
(``server.engine.multiproc``) with the output processor in the API process.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from model.jetmoe import JetMoeForCausalLM
from model.kernels import KernelChoice
from model.loader import load_model
from model.tokenizer import Tokenizer
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.core import EngineCore, EngineStats
from server.engine.output_processor import OutputProcessor
from server.engine.request import RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import Scheduler
from server.engine.structured.compiler import GrammarCompiler
from server.engine.token_bytes import TokenBytes
from server.engine.validation import RequestRejected, validate_request
from server.engine.worker.runner import ModelRunner

__all__ = ["EngineStats", "LLMEngine", "RequestRejected", "load_engine_core"]
logger = logging.getLogger(__name__)


def load_engine_core(config: EngineConfig) -> EngineCore:
    """Load the checkpoint and tokenizer named by ``config.model`` into an engine core."""
    choice = KernelChoice(attention=config.attention_backend)
    model = load_model(config.model, dtype=config.dtype, device=config.device, kernels=choice)
    logger.info("kernels: %s", model.kernels.describe())
    return EngineCore(config, model, Tokenizer.from_dir(config.model))


class LLMEngine:
    """Keeps many requests moving on one model; each gets exactly the tokens it would get alone."""

    def __init__(self, config: EngineConfig, model: JetMoeForCausalLM, tokenizer: Tokenizer) -> None:
        self._attach(EngineCore(config, model, tokenizer))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        """Load the checkpoint and tokenizer named by ``config.model``."""
        engine = cls.__new__(cls)
        engine._attach(load_engine_core(config))
        return engine

    def _attach(self, core: EngineCore) -> None:
        self.core = core
        self.outputs = OutputProcessor(core.tokenizer)
        self._n: dict[str, int] = {}  # samples per request in flight

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def model(self) -> JetMoeForCausalLM:
        return self.core.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def num_kv_blocks(self) -> int:
        return self.core.num_kv_blocks

    @property
    def vocab_size(self) -> int:
        return self.core.model.config.vocab_size

    @property
    def grammars(self) -> GrammarCompiler:
        return self.core.grammars

    @property
    def token_bytes(self) -> TokenBytes:
        return self.outputs.token_bytes

    # The core's parts, for tests and tools that look at them directly.
    @property
    def blocks(self) -> BlockManager:
        return self.core.blocks

    @property
    def scheduler(self) -> Scheduler:
        return self.core.scheduler

    @property
    def runner(self) -> ModelRunner:
        return self.core.runner

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``RequestRejected``/``SamplingParamsError`` for a request that cannot be served."""
        validate_request(prompt_ids, params, self.tokenizer, self.vocab_size, self.max_model_len)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Queue ``params.n`` samples of one prompt; raises for invalid requests."""
        if request_id in self._n:
            raise RequestRejected(f"duplicate request id {request_id!r}")
        self.validate(prompt_ids, params)
        self.core.add_request(request_id, prompt_ids, params)
        self.outputs.add_request(request_id, prompt_ids, params)
        self._n[request_id] = params.n

    def abort(self, request_id: str) -> None:
        """Stop a request (all its samples) and free its blocks at once."""
        self.core.abort(request_id)
        self.outputs.abort(request_id, self._n.pop(request_id, 0))

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, detokenize; returns one delta per sampling request."""
        processed = self.outputs.process(self.core.step())
        for (request_id, index), reason in processed.finished_here:
            self.core.finish_sample(request_id, index, reason)
        for output in processed.outputs:
            if output.finished and not self.core.holds(output.request_id):
                self._n.pop(output.request_id, None)
        return processed.outputs

    def stats(self) -> EngineStats:
        return self.core.stats()

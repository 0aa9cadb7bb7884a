"""The engine core: scheduler, block pool, runner and sampler over one model; token ids in, token ids out.

``EngineCore.step`` schedules, runs the model once, samples and decides which sequences end on a token (EOS,
stop token ids, ``max_tokens``, the context length, a completed grammar). With a ``SpeculativeConfig`` the
decoding sequences propose tokens first (``server.engine.spec``); the step verifies them and a sequence may
then get several tokens, each processed as if it had come from its own step. Text, stop strings and logprob
rendering live outside the core (``server.engine.output_processor``), so that the core can run in its own
process (``server.engine.multiproc``) or in-process (``server.engine.llm_engine``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from model.jetmoe import JetMoeForCausalLM
from model.tokenizer import Tokenizer
from server.engine.block_manager import BlockManager
from server.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from server.engine.kv_events import KVEventPublisher
from server.engine.logit_masks import bad_words_token_ids
from server.engine.request import CoreOutput, Request, TokenLogprob
from server.engine.sampler import SamplerOutput, make_generator
from server.engine.sampling_params import SamplingParams
from server.engine.scheduler import ScheduledRequest, Scheduler, SchedulerConfig
from server.engine.spec.decoder import SpecCounters, SpecDecoder
from server.engine.structured.compiler import GrammarCompiler
from server.engine.structured.pending import CompilingRequests
from server.engine.worker.decode_graphs import graph_batch_sizes
from server.engine.worker.memory import GIB, plan_for_device
from server.engine.worker.runner import ModelRunner, kv_block_bytes, kv_blocks_for_memory

logger = logging.getLogger(__name__)
_COMPILE_WAIT_S = 0.005


@dataclass(frozen=True)
class EngineStats:
    """Scheduler and cache counters as of the last step; with speculation, vLLM's ``spec_decode_num_*``
    totals (acceptance rate = accepted / draft tokens, mean accepted length = 1 + accepted / drafts)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0


class EngineCore:
    """Keeps many requests moving on one model; each gets exactly the tokens it would get alone.

    Requests reach it validated (``server.engine.validation``): the core does not check them again.
    """

    def __init__(self, config: EngineConfig, model: JetMoeForCausalLM, tokenizer: Tokenizer) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = min(
            config.max_model_len or model.config.max_position_embeddings, model.config.max_position_embeddings
        )
        self.token_budget = config.token_budget(model.output_weight().device.type)
        num_blocks = _num_kv_blocks(config, model, self.max_model_len)
        if num_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens, fewer than max_model_len "
                f"{self.max_model_len}: lower --max-model-len or give the cache more memory"
            )
        self.kv_events = (
            KVEventPublisher(config.kv_events_endpoint, config.kv_events_topic) if config.kv_events_endpoint else None
        )
        self.blocks = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching, record_events=self.kv_events is not None
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, self.token_budget, self.max_model_len),
            self.blocks,
        )
        self.runner = ModelRunner(model, num_blocks, config.block_size)
        _log_kv_cache(num_blocks, config.block_size, self.max_model_len, model)
        if decode_graphs_apply(config, model):
            started = time.perf_counter()
            sizes = graph_batch_sizes(config.max_num_seqs)
            self.runner.enable_decode_graphs(sizes, self.max_model_len)
            logger.info("captured CUDA graphs for decode batches of %s sequences in %.1f s",
                        ", ".join(map(str, sizes)), time.perf_counter() - started)
        spec = config.speculative_config
        self.spec = SpecDecoder(spec, self.max_model_len, model.config.vocab_size) if spec is not None else None
        if spec is not None:
            logger.info("speculative decoding: %s, up to %d tokens from n-grams of %d..%d tokens (steps that "
                        "verify proposals run eagerly)", spec.method, spec.num_speculative_tokens,
                        spec.prompt_lookup_min, spec.prompt_lookup_max)
        self._requests: dict[str, list[Request]] = {}
        self.grammars = GrammarCompiler(tokenizer.hf, model.config.vocab_size)
        self._compiling = CompilingRequests(self.grammars)

    @property
    def num_kv_blocks(self) -> int:
        return self.blocks.num_blocks

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue ``params.n`` samples of one (validated) prompt."""
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        children = [self._new_request(request_id, i, list(prompt_ids), params) for i in range(params.n)]
        if arrival_time is not None:
            for child in children:
                child.arrival_time = arrival_time
        self._requests[request_id] = children
        if params.structured is not None:
            self._compiling.add(children)  # scheduled once its grammar is compiled
            return
        for child in children:
            self.scheduler.add(child)

    def abort(self, request_id: str) -> None:
        """Stop a request (all its samples) and free its blocks at once."""
        self._compiling.abort(request_id)
        for request in self._requests.pop(request_id, []):
            self.scheduler.finish(request, "abort")
            if self.spec is not None:
                self.spec.drop(request)

    def finish_sample(self, request_id: str, index: int, reason: str = "stop") -> None:
        """End one sample (a stop string found outside the core); its blocks are freed at once."""
        for request in self._requests.get(request_id, []):
            if request.index == index and not request.is_finished:  # it produced tokens: it is scheduled
                self._finish(request, reason)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._compiling)

    def holds(self, request_id: str) -> bool:
        """Whether a sample of ``request_id`` is still queued, compiling or running."""
        return request_id in self._requests

    @property
    def num_requests(self) -> int:
        """Requests (parents of ``n`` samples) the core holds."""
        return len(self._requests)

    def step(self) -> list[CoreOutput]:
        """Schedule, run the model once, sample; one output per sequence that got a token (or failed)."""
        outputs = self._admit_compiled()
        drafts = self.spec.propose(self.scheduler.running) if self.spec is not None else None
        step = self.scheduler.schedule(drafts) if drafts else self.scheduler.schedule()
        if not step.scheduled:
            if not outputs:
                self._compiling.wait(_COMPILE_WAIT_S)  # only grammars in flight: wait for one, do not spin
            return outputs
        try:
            sampled = self.runner.execute(step)
        except Exception as exc:  # a failed step fails its requests; the engine keeps serving the rest
            logger.exception("engine step failed")
            self.blocks.reset_prefix_cache()  # blocks registered this step may hold garbage
            return outputs + [self._fail(s.request, exc) for s in step.scheduled]
        finally:
            if self.kv_events is not None:
                self.kv_events.publish(self.blocks.take_events())
        for item in step.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if request.key in sampled:
                self._settle_drafts(item, len(sampled[request.key].token_ids) - 1)
                outputs.append(self._append_token(request, sampled[request.key]))
        return outputs

    def _settle_drafts(self, item: ScheduledRequest, accepted: int) -> None:
        """Keep the K/V of the ``accepted`` proposed tokens; roll back the rest (their blocks are freed)."""
        if not item.draft_token_ids:
            return
        request = item.request
        request.num_computed_tokens += accepted
        self.blocks.trim(request)
        if self.spec is not None:
            self.spec.record(request, len(item.draft_token_ids), accepted)

    def stats(self) -> EngineStats:
        counters = self.spec.counters if self.spec is not None else SpecCounters()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.blocks.usage,
            prefix_cache_queries=self.blocks.prefix_cache_queries,
            prefix_cache_hits=self.blocks.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            spec_decode_num_drafts=counters.drafts,
            spec_decode_num_draft_tokens=counters.draft_tokens,
            spec_decode_num_accepted_tokens=counters.accepted_tokens,
        )

    def _admit_compiled(self) -> list[CoreOutput]:
        """Queue the samples whose grammar is ready; fail those whose grammar could not be compiled."""
        ready, failed = self._compiling.pop_done()
        for request in ready:
            self.scheduler.add(request)
        return [self._fail(request, exc) for request, exc in failed]

    def _new_request(self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams) -> Request:
        generator = None
        if params.seed is not None:
            generator = make_generator(params.seed + index, self.runner.device)
        request = Request(request_id, index, prompt_ids, params, generator)
        request.bad_words = bad_words_token_ids(self.tokenizer, params.bad_words)
        eos = self.tokenizer.eos_token_id
        stops = set(params.stop_token_ids) | ({eos} if eos is not None and not params.ignore_eos else set())
        request.min_tokens_blocked = tuple(sorted(stops)) if params.min_tokens else ()
        return request

    def _append_token(self, request: Request, sampled: SamplerOutput) -> CoreOutput:
        try:
            return self._process_token(request, sampled)
        except Exception as exc:  # e.g. a grammar that rejects the token: fail this request only
            logger.exception("processing request %s failed", request.request_id)
            return self._fail(request, exc)

    def _process_token(self, request: Request, sampled: SamplerOutput) -> CoreOutput:
        """The step's tokens of one sequence (several after verified proposals), in order, until one ends it."""
        tokens: list[int] = []
        reason: str | None = None
        by_token = False
        for token in sampled.token_ids:
            tokens.append(token)
            reason, by_token = self._accept(request, token)
            if reason is not None:
                break
        params = request.params
        output = self._output(request, tokens, reason)
        output.stopped_by_token = by_token
        output.stop_reason = tokens[-1] if by_token and tokens[-1] in params.stop_token_ids else None
        output.logprobs = _token_logprobs(tokens, sampled) if params.logprobs is not None else None
        if reason is not None:
            self._finish(request, reason)
        return output

    def _accept(self, request: Request, token: int) -> tuple[str | None, bool]:
        """Append one token; returns the finish reason it causes (or None) and whether it is a stop token."""
        request.output_ids.append(token)
        if request.grammar is not None and not request.grammar.accept(token):
            raise RuntimeError(f"token {token} was sampled against the request's grammar")
        # NOTE: a grammar allows EOS only once the output is complete; then EOS ends it even with ignore_eos.
        completed = request.grammar is not None and request.grammar.is_terminated
        by_token = self._is_stop_token(request, token) or (completed and token == self.tokenizer.eos_token_id)
        if by_token or completed:
            return "stop", by_token
        if len(request.output_ids) >= request.params.max_tokens or request.num_tokens >= self.max_model_len:
            return "length", False
        return None, False

    def _is_stop_token(self, request: Request, token: int) -> bool:
        """EOS (unless ignored) or a stop token id, once min_tokens were generated."""
        params = request.params
        if len(request.output_ids) < params.min_tokens:
            return False
        return (token == self.tokenizer.eos_token_id and not params.ignore_eos) or token in params.stop_token_ids

    def _output(self, request: Request, tokens: list[int], reason: str | None) -> CoreOutput:
        first = len(request.output_ids) == len(tokens)
        return CoreOutput(
            request_id=request.request_id,
            index=request.index,
            new_token_ids=tokens,
            finish_reason=reason,
            num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=list(request.prompt_logprobs) if first and request.wants_prompt_logprobs else None,
            queue_time=_queue_time(request) if first else None,
        )

    def _finish(self, request: Request, reason: str) -> None:
        self.scheduler.finish(request, reason)
        if self.spec is not None:
            self.spec.drop(request)
        siblings = self._requests.get(request.request_id, [])
        if all(r.is_finished for r in siblings):
            self._requests.pop(request.request_id, None)

    def _fail(self, request: Request, exc: Exception) -> CoreOutput:
        self._finish(request, "error")
        output = self._output(request, [], "error")
        output.error = f"{type(exc).__name__}: {exc}"
        return output


def _queue_time(request: Request) -> float | None:
    if request.first_scheduled_time is None:
        return None
    return request.first_scheduled_time - request.arrival_time


def _token_logprobs(tokens: list[int], sampled: SamplerOutput) -> list[TokenLogprob]:
    return [
        TokenLogprob(token,
                     sampled.logprobs[i] if sampled.logprobs else float("nan"),
                     sampled.top_logprobs[i] if sampled.top_logprobs else [])
        for i, token in enumerate(tokens)
    ]


def decode_graphs_apply(config: EngineConfig, model: JetMoeForCausalLM) -> bool:
    """CUDA graphs for decode: on CUDA, unless ``enforce_eager``, when the forward never syncs with the host."""
    device = model.output_weight().device
    if device.type != "cuda" or config.enforce_eager:
        return False
    if not model.kernels.cuda_graph_safe:
        logger.warning("CUDA graphs are off: kernels %s cannot be captured (the torch attention backend or the "
                       "per-expert loop)", model.kernels.describe())
        return False
    return True


def _log_kv_cache(num_blocks: int, block_size: int, max_model_len: int, model: JetMoeForCausalLM) -> None:
    tokens = num_blocks * block_size
    size = (num_blocks + 1) * kv_block_bytes(model, block_size, model.output_weight().dtype)
    logger.info("KV cache: %d blocks of %d tokens = %d tokens (%.2f GiB), %.1fx max_model_len %d",
                num_blocks, block_size, tokens, size / GIB, tokens / max_model_len, max_model_len)


def _num_kv_blocks(config: EngineConfig, model: JetMoeForCausalLM, max_model_len: int) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    weight = model.output_weight()
    if weight.device.type == "cuda" and config.kv_cache_memory is None:
        graphs = not config.enforce_eager and model.kernels.cuda_graph_safe  # as decode_graphs_apply decides
        graph_batch = config.max_num_seqs if graphs else 0
        plan = plan_for_device(
            model, config.token_budget("cuda"), max_model_len, config.block_size, config.gpu_memory_utilization,
            graph_batch=graph_batch,
        )
        logger.info("memory: %s", plan.describe())
        memory = plan.kv_cache
    else:
        memory = config.kv_cache_memory or DEFAULT_CPU_KV_CACHE_BYTES
    blocks = kv_blocks_for_memory(model, config.block_size, memory, weight.dtype)
    if blocks < 1:
        raise ValueError(f"{memory} bytes of KV cache memory hold no block of {config.block_size} tokens")
    return blocks

"""Token ids from the engine core -> text deltas: detokenization and stop strings, per sample.

The core ends sequences on tokens (EOS, stop token ids, lengths, grammars); stop strings are found here, and
the sample is then reported in ``Processed.finished_here`` so that the caller ends it in the core too (tokens
the core computed after the stop are never shown). Runs wherever the caller runs: in-process with
``LLMEngine``, in the API process with the multi-process engine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from model.tokenizer import Tokenizer
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.request import CoreOutput, RequestOutput
from server.engine.sampling_params import SamplingParams
from server.engine.token_bytes import TokenBytes

logger = logging.getLogger(__name__)
SampleKey = tuple[str, int]  # (request id, sample index)


@dataclass
class _Sample:
    detokenizer: IncrementalDetokenizer
    params: SamplingParams
    num_prompt_tokens: int
    num_output_tokens: int = 0


@dataclass
class Processed:
    """One step's deltas, and the samples that ended here (a stop string, a failure) but not in the core."""

    outputs: list[RequestOutput] = field(default_factory=list)
    finished_here: list[tuple[SampleKey, str]] = field(default_factory=list)  # (key, reason)


class OutputProcessor:
    """Per-sample detokenizers of every request in flight."""

    def __init__(self, tokenizer: Tokenizer, token_bytes: TokenBytes | None = None) -> None:
        self.tokenizer = tokenizer
        self.token_bytes = token_bytes or TokenBytes(tokenizer)
        self._samples: dict[SampleKey, _Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def add_request(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        for index in range(params.n):
            self._samples[(request_id, index)] = _Sample(self._detokenizer(prompt_ids, params), params,
                                                         len(prompt_ids))

    def detokenizer_of(self, key: SampleKey) -> IncrementalDetokenizer:
        """The detokenizer of a sample in flight."""
        return self._samples[key].detokenizer

    def abort(self, request_id: str, n: int) -> None:
        for index in range(n):
            self._samples.pop((request_id, index), None)

    def process(self, outputs: Sequence[CoreOutput]) -> Processed:
        """Deltas for the samples still followed here; late outputs of samples already ended are dropped."""
        processed = Processed()
        for core in outputs:
            sample = self._samples.get(core.key)
            if sample is None:
                continue
            try:
                output = self._delta(sample, core)
            except Exception as exc:  # e.g. a detokenizer failure: fail this sample only
                logger.exception("processing request %s failed", core.request_id)
                output = self._error(sample, core, f"{type(exc).__name__}: {exc}")
                if core.finish_reason is None:
                    processed.finished_here.append((core.key, "error"))
            processed.outputs.append(output)
            if output.finished:
                del self._samples[core.key]
                if core.finish_reason is None and output.error is None:
                    processed.finished_here.append((core.key, output.finish_reason or "stop"))
        return processed

    def _detokenizer(self, prompt_ids: Sequence[int], params: SamplingParams) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens,
            include_stop_str_in_output=params.include_stop_str_in_output,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            min_tokens=params.min_tokens, token_bytes=self.token_bytes,
        )

    def _delta(self, sample: _Sample, core: CoreOutput) -> RequestOutput:
        if core.error is not None:
            return self._error(sample, core, core.error)
        detok, include_stop = sample.detokenizer, sample.params.include_stop_str_in_output
        text: list[str] = []
        reason: str | None = None
        stop_reason: str | int | None = None
        consumed = 0
        for i, token in enumerate(core.new_token_ids):
            last = i == len(core.new_token_ids) - 1
            consumed += 1
            if last and core.stopped_by_token:
                reason, stop_reason = core.finish_reason, core.stop_reason
            if reason is None or include_stop:
                delta = detok.add_tokens([token])
                text.append(delta.text)
                if reason is None and delta.stopped:
                    reason, stop_reason = "stop", delta.stop_string
            if reason is None and last:
                reason = core.finish_reason
            if reason is not None:
                break
        if reason is not None and not detok.stopped:
            text.append(detok.flush())
        sample.num_output_tokens += consumed
        logprobs = core.logprobs[:consumed] if core.logprobs is not None else None
        return self._output(sample, core, core.new_token_ids[:consumed], "".join(text), reason, stop_reason,
                            logprobs)

    def _error(self, sample: _Sample, core: CoreOutput, error: str) -> RequestOutput:
        output = self._output(sample, core, [], "", "error", None, None)
        output.error = error
        return output

    def _output(self, sample: _Sample, core: CoreOutput, tokens: list[int], text: str, reason: str | None,
                stop_reason: str | int | None, logprobs: list | None) -> RequestOutput:
        return RequestOutput(
            request_id=core.request_id,
            index=core.index,
            new_token_ids=tokens,
            new_text=text,
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=sample.num_prompt_tokens,
            num_output_tokens=sample.num_output_tokens,
            num_cached_tokens=core.num_cached_tokens,
            logprobs=logprobs,
            prompt_logprobs=core.prompt_logprobs,
            queue_time=core.queue_time,
            stop_reason=stop_reason,
        )

"""The messages between the API process and the engine-core process survive encoding exactly."""

from __future__ import annotations

import math

from server.engine.core import EngineStats
from server.engine.multiproc.messages import (
    AbortRequests,
    AddRequest,
    CoreFailed,
    CoreInfo,
    FinishSamples,
    Shutdown,
    StepOutputs,
    decode_input,
    decode_output,
    encode_input,
    encode_output,
)
from server.engine.request import CoreOutput, TokenLogprob
from server.engine.sampling_params import SamplingParams
from server.engine.structured.spec import StructuredSpec


def test_commands_round_trip_with_their_sampling_parameters() -> None:
    params = SamplingParams(n=2, max_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop=["\n"], logprobs=2,
                            logit_bias={"5": 1.5}, stop_token_ids=[9], bad_words=["x"],
                            structured=StructuredSpec("json_object", "", "response_format"))
    for message in (AddRequest("r-1", [1, 2, 3], params, 12.5), AbortRequests(["a", "b"]),
                    FinishSamples([("r-1", 1, "stop")]), Shutdown()):
        assert decode_input(encode_input(message)) == message


def test_a_step_message_round_trips_every_field() -> None:
    logprobs = [TokenLogprob(7, -0.25, [(7, -0.25), (3, -1.5)])]
    prompt = [None, TokenLogprob(4, -2.0, [(4, -2.0)], rank=1)]
    outputs = [
        CoreOutput("a", 0, [7], None, num_cached_tokens=16, logprobs=logprobs, prompt_logprobs=prompt,
                   queue_time=0.125),
        CoreOutput("a", 1, [2], "stop", stopped_by_token=True, stop_reason=2),
        CoreOutput("b", 0, [], "error", error="RuntimeError: boom"),
        CoreOutput("c", 0, [5, 6, 7], "length"),
    ]
    stats = EngineStats(3, 1, 0.5, 10, 4, 2)
    decoded = decode_output(encode_output(StepOutputs(outputs, stats)))
    assert decoded == StepOutputs(outputs, stats)


def test_nan_logprobs_and_startup_messages_survive() -> None:
    out = CoreOutput("a", 0, [1], None, logprobs=[TokenLogprob(1, float("nan"), [])])
    decoded = decode_output(encode_output(StepOutputs([out], EngineStats(0, 0, 0.0, 0, 0, 0))))
    assert isinstance(decoded, StepOutputs) and math.isnan(decoded.outputs[0].logprobs[0].logprob)
    info = CoreInfo(512, 256, 1500, "cpu", "float32", "attention=torch")
    assert decode_output(encode_output(info)) == info
    assert decode_output(encode_output(CoreFailed("no config.json"))) == CoreFailed("no config.json")

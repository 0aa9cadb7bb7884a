"""What one engine step's message costs to cross between the API process and the engine core.

    python -m benchmarks.bench_ipc [--sequences 64] [--repeats 2000]

A step message of ``--sequences`` decoding sequences (one new token each, a quarter with 5 logprobs), encoded
and decoded with this project's msgpack codec (``server.engine.multiproc.messages``) and, for comparison, with
pickle; then the round trip over the same ZeroMQ ``ipc://`` PUSH/PULL pair the server uses, against the time
of one CPU decode step (about 50 ms for the engine benchmark's 64 sequences on 2 cores).
"""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from collections.abc import Callable

import zmq

from server.engine.core import EngineStats
from server.engine.multiproc.messages import StepOutputs, decode_output, encode_output
from server.engine.request import CoreOutput, TokenLogprob


def step_message(sequences: int) -> StepOutputs:
    outputs = []
    for i in range(sequences):
        logprobs = [TokenLogprob(100 + i, -0.5, [(100 + i, -0.5), (7, -1.25), (8, -2.0), (9, -2.5), (10, -3.0)])]
        outputs.append(CoreOutput(f"cmpl-{i:032x}", 0, [100 + i], logprobs=logprobs if i % 4 == 0 else None))
    return StepOutputs(outputs, EngineStats(sequences, 0, 0.25, 1000, 400, 0))


def per_call_us(fn: Callable[[], object], repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e6


def zmq_round_trip_us(data: bytes, repeats: int) -> float:
    context = zmq.Context()
    with tempfile.TemporaryDirectory() as directory:
        pull = context.socket(zmq.PULL)
        pull.bind(f"ipc://{directory}/bench")
        push = context.socket(zmq.PUSH)
        push.connect(f"ipc://{directory}/bench")

        def once() -> None:
            push.send(data)
            pull.recv()

        result = per_call_us(once, repeats)
        push.close(0)
        pull.close(0)
    context.term()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2000)
    args = parser.parse_args()
    message = step_message(args.sequences)
    packed = encode_output(message)
    pickled = pickle.dumps(message, protocol=5)
    rows = [
        ("msgpack encode", per_call_us(lambda: encode_output(message), args.repeats), len(packed)),
        ("msgpack decode", per_call_us(lambda: decode_output(packed), args.repeats), len(packed)),
        ("pickle encode", per_call_us(lambda: pickle.dumps(message, protocol=5), args.repeats), len(pickled)),
        ("pickle decode", per_call_us(lambda: pickle.loads(pickled), args.repeats), len(pickled)),
        ("ZeroMQ ipc:// send + recv (msgpack bytes)", zmq_round_trip_us(packed, args.repeats), len(packed)),
    ]
    print(f"\n## One step message: {args.sequences} sequences, {args.repeats} repeats\n")
    print("| operation | us per step | bytes |")
    print("|---|---:|---:|")
    for name, us, size in rows:
        print(f"| {name} | {us:.1f} | {size} |")


if __name__ == "__main__":
    main()

"""When requests are sent: gamma-distributed gaps between arrivals, as vLLM's benchmark draws them.

With ``burstiness`` 1 the gaps are exponential (a Poisson process); below 1 arrivals come in bursts, above 1
they are more evenly spaced. The mean gap is always ``1 / request_rate``; an infinite rate sends every
request at once.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def inter_arrival_gaps(count: int, request_rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """``count`` gaps in seconds, each drawn from Gamma(shape=burstiness, scale=1 / (rate * burstiness))."""
    if math.isinf(request_rate):
        return [0.0] * count
    theta = 1.0 / (request_rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(count)]


def arrival_schedule(count: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times in seconds from the start: the first request at 0, each next one a drawn gap later."""
    gaps = inter_arrival_gaps(max(count - 1, 0), request_rate, burstiness, random.Random(seed))
    times = [0.0]
    for gap in gaps:
        times.append(times[-1] + gap)
    return times[:count]


async def paced(items: Sequence[T], schedule: Sequence[float]) -> AsyncIterator[T]:
    """Yield ``items[i]`` at ``schedule[i]`` seconds after the first one (absolute times: no drift)."""
    start = time.perf_counter()
    for item, at in zip(items, schedule):
        delay = at - (time.perf_counter() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        yield item

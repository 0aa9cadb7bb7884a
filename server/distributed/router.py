"""Prefix-affinity routing on Ray Serve's request-router API (``ray.serve.request_router.RequestRouter``).

The ingress calls the engine replicas through a ``DeploymentHandle`` whose deployment is configured with this
router; every forwarded request carries its prompt's chained prefix hashes as the ``prefix`` keyword. ``choose_replicas`` returns the replicas one per rank, in ``PrefixTable.order``:
the replica that was sent the longest part of the prompt's prefix first (its KV cache most likely holds it),
then the least loaded. Serve tries the ranks in turn and skips a replica at its queue limit
(``max_ongoing_requests``, from the router's queue-length cache or a probe), so a full replica passes its
request on to the next best one; when every replica is full it backs off and tries again.

Load is the number of requests this router has in flight on each replica (counted from
``on_request_routed`` to ``on_request_completed``), or the replica's own count from Serve's queue-length
cache when that is higher (several ingress replicas each see only their own requests).
"""

from __future__ import annotations

import threading
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from server.distributed.prefix import CHUNKS_PER_REPLICA, PrefixTable

PREFIX_KWARG = "prefix"


def prefix_of(request: PendingRequest | None) -> tuple[int, ...]:
    """The call's prompt-prefix hashes (the ``prefix`` keyword of ``forward``; none on other calls).

    A plain tuple of ints, not a class of this package: Serve ships the router class to the handle's process
    by value, so a class defined beside it would not be the class the caller made its argument from."""
    prefix = request.kwargs.get(PREFIX_KWARG) if request is not None else None
    return prefix if isinstance(prefix, tuple) else ()


class PrefixAffinityRouter(RequestRouter):
    """Longest cached prefix first, else least loaded; replicas at their queue limit are skipped by Serve."""

    def initialize_state(self, chunks_per_replica: int = CHUNKS_PER_REPLICA, **_: Any) -> None:
        """Called by Serve with ``request_router_kwargs``."""
        self._table: PrefixTable[ReplicaID] = PrefixTable(chunks_per_replica)
        self._in_flight: dict[ReplicaID, int] = {}
        self._routed: dict[str, ReplicaID] = {}  # internal request id -> replica, until completed
        self._lock = threading.Lock()  # completion callbacks may run on another thread than routing

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Every candidate in its own rank, most preferred first."""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # one pass over all ranks, then back off
        by_id = {r.replica_id: r for r in candidate_replicas}
        with self._lock:
            load = {rid: max(self._in_flight.get(rid, 0), self.replica_queue_len_cache.get(rid) or 0)
                    for rid in by_id}
            order = self._table.order(by_id, prefix_of(pending_request), load)
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The replica accepted the request: it now holds the prompt's prefix, and one more request."""
        request_id = pending_request.metadata.internal_request_id
        with self._lock:
            self._table.record(replica_id, prefix_of(pending_request))
            self._routed[request_id] = replica_id
            self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A request ended (also called for requests a replica rejected, which were never counted)."""
        with self._lock:
            if self._routed.get(internal_request_id) == replica_id:
                del self._routed[internal_request_id]
                self._in_flight[replica_id] = max(0, self._in_flight.get(replica_id, 0) - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replica set changed: replicas that left take their prefixes with them."""
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        with self._lock:
            self._table.keep_only(alive)
            for rid in [rid for rid in self._in_flight if rid not in alive]:
                del self._in_flight[rid]

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A replica died: its cache is gone."""
        super().on_replica_actor_died(replica_id)
        with self._lock:
            self._table.forget(replica_id)
            self._in_flight.pop(replica_id, None)

"""Sticky routing: a sequence's KV lives in one replica of each stage, so its steps must go there.

A stage replica that takes a sequence's prefill reports its replica id; the front door records
one id per stage (the sequence's *route*) and sends every later message for that sequence with
``session_id=pin(replica_id)``. :class:`PinnedReplicaRouter` sends such a message to exactly that
replica, and any other message (a new sequence's prefill) to the less loaded of two random
replicas. Explicit pins stay correct when a stage scales: existing sequences keep their
replicas, new sequences spread over all of them.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

_PIN_PREFIX = "sedac-replica:"


def pin(replica_id: str) -> str:
    """The ``session_id`` that routes a request to replica ``replica_id``."""
    return _PIN_PREFIX + replica_id


def pinned_replica(session_id: str | None) -> str | None:
    if session_id and session_id.startswith(_PIN_PREFIX):
        return session_id[len(_PIN_PREFIX) :]
    return None


class PinnedReplicaRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # no busy loop while a replica is full
        target = pinned_replica(pending_request.metadata.session_id) if pending_request else None
        if target is not None:
            # Only the pinned replica holds this sequence's KV; if it is gone, nothing else can
            # serve the request and the caller's timeout reports it.
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        # Two random replicas (in random order, so ties in queue length split evenly); the less
        # loaded one takes the new sequence.
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Hand ``replica`` to the oldest pending request that may go there. FIFOMixin alone would
        give it to the oldest request of all, even one pinned to another replica."""
        for pending in list(self._pending_requests_to_fulfill):
            if pending.future.done():
                continue
            target = pinned_replica(pending.metadata.session_id)
            if target is None or target == replica.replica_id.unique_id:
                self._pending_requests_to_fulfill.remove(pending)
                self._cancel_routing_task_for_pending_request(pending)
                self._record_queue_wait_time(pending)
                pending.future.set_result(replica)
                self._remove_pending_request_from_indices(pending)
                return

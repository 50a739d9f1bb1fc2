"""Sticky routing: a sequence's KV lives in one replica of each stage, so its steps must go there.

A stage replica that takes a sequence's prefill reports its replica id; the front door records
one id per stage (the sequence's *route*) and sends every later message for that sequence with
``session_id=pin(replica_id)``. :class:`PinnedReplicaRouter` sends such a message to exactly that
replica, and any other message (a new sequence's prefill) to the less loaded of two random
replicas. Explicit pins stay correct when a stage scales: existing sequences keep their
replicas, new sequences spread over all of them.

If a pinned replica has left the running set for longer than :data:`PIN_GRACE_S` (it died or was
scaled away), its requests fail at once with :class:`ReplicaGone` (503 / ``UNAVAILABLE``) instead
of waiting for a step timeout: nothing else holds that sequence's KV.
"""

from __future__ import annotations

import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from sedac_ray.serve.errors import ReplicaGone

_PIN_PREFIX = "sedac-replica:"
PIN_GRACE_S = 5.0  # a replica missing from the routing table this long is gone, not just late


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
            # Only the pinned replica holds this sequence's KV; nothing else can serve the request.
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            missing_since = self.__dict__.setdefault("_pinned_missing_since", {})
            if chosen:
                missing_since.pop(target, None)
                return [chosen]
            if time.monotonic() - missing_since.setdefault(target, time.monotonic()) > PIN_GRACE_S:
                if not pending_request.future.done():
                    pending_request.future.set_exception(
                        ReplicaGone(f"replica {target} holding this sequence's KV is gone; retry the request")
                    )
                # Offer a candidate so the routing loop looks at the request again, sees it done and
                # moves on; with nothing offered it would retry this request forever.
                return [candidate_replicas]
            return [[]]
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

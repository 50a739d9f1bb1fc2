"""What can go wrong with a request, and how each protocol says it.

Every failure a client can see is a :class:`ServeError` subclass that carries its HTTP status,
its gRPC status code and, where waiting helps, a retry hint. The classes are plain exceptions
with a single message argument, so they survive crossing Ray process boundaries (Ray re-raises a
remote error as a subclass of its cause, and keeps the cause in ``.cause``).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from fastapi.responses import JSONResponse
from ray import exceptions as ray_exceptions

logger = logging.getLogger("ray.serve")


class ServeError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    kind = "internal_error"
    retry_after_s: float | None = None

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.kind


class InvalidRequest(ServeError, ValueError):
    """The request cannot be served as sent; the message says why and what to change."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "invalid_request_error"


class MalformedRequest(InvalidRequest):
    """Not parseable as the API's JSON (wrong types, broken JSON, not UTF-8)."""

    http_status = 422


class RequestTooLarge(InvalidRequest):
    http_status = 413


class Unauthenticated(ServeError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    kind = "authentication_error"


class Overloaded(ServeError):
    """At capacity (concurrency limit or KV budget): the same request may succeed shortly."""

    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "overloaded"
    retry_after_s = 1.0


class Unavailable(ServeError):
    """A pipeline replica failed or stopped answering; retrying is safe."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    kind = "unavailable"
    retry_after_s = 2.0


class DeadlineExceeded(ServeError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    kind = "timeout"


class ReplicaGone(Unavailable):
    """The replica that holds a sequence's KV is no longer running (raised by the router)."""


# Failures of the cluster rather than of the request: the request may be retried from scratch.
_REPLICA_FAILURES = (
    ray_exceptions.RayActorError,
    ray_exceptions.ActorUnavailableError,
    ray_exceptions.WorkerCrashedError,
    ray_exceptions.NodeDiedError,
)


def as_serve_error(error: BaseException) -> ServeError:
    """The client-facing error for anything raised while serving a request."""
    cause = error
    while isinstance(cause, ray_exceptions.RayTaskError) and getattr(cause, "cause", None) is not None:
        cause = cause.cause  # the original exception, without the remote traceback text
    if isinstance(cause, ServeError):
        return type(cause)(cause.message)
    if isinstance(cause, _REPLICA_FAILURES) or isinstance(error, _REPLICA_FAILURES):
        return Unavailable(f"a pipeline replica failed ({type(cause).__name__}); retry the request")
    if isinstance(cause, asyncio.TimeoutError):
        return Unavailable("a pipeline stage did not answer in time; retry the request")
    logger.error(f"internal error while serving a request: {cause!r}")
    return ServeError("internal error")


def http_error(error: ServeError, request_id: str) -> JSONResponse:
    headers = {"x-request-id": request_id}
    if error.retry_after_s is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after_s)))
    body = {"error": {"message": error.message, "type": error.kind, "request_id": request_id}}
    return JSONResponse(status_code=error.http_status, content=body, headers=headers)


def set_grpc_error(grpc_context, error: ServeError, request_id: str) -> None:
    if grpc_context is None:
        return
    grpc_context.set_code(error.grpc_code)
    details = error.message
    if error.retry_after_s is not None:
        details += f" (retry after {error.retry_after_s:g} s)"
    grpc_context.set_details(f"{details} [request_id {request_id}]")
    if error.retry_after_s is not None:
        grpc_context.set_trailing_metadata([("retry-after-ms", str(int(error.retry_after_s * 1000)))])

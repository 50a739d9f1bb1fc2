"""Registers ``sedac.v1.SedacService`` with the gRPC server (the ``grpc_servicer_functions`` entry).

It is the generated ``add_SedacServiceServicer_to_server`` with one change: a request that does
not parse (a string field that is not UTF-8, truncated bytes) becomes an :class:`UnparsableRequest`
instead of an exception inside the gRPC proxy, so the front door can answer ``INVALID_ARGUMENT``
with what to fix rather than a bare ``INTERNAL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from sedac_ray.serve.generated import sedac_pb2

SERVICE = "sedac.v1.SedacService"


@dataclass
class UnparsableRequest:
    reason: str
    size: int


def parse_generate_request(data: bytes) -> sedac_pb2.GenerateRequest | UnparsableRequest:
    try:
        return sedac_pb2.GenerateRequest.FromString(data)
    except DecodeError as err:
        return UnparsableRequest(str(err) or "malformed protobuf", len(data))


def add_SedacServiceServicer_to_server(servicer, server) -> None:  # noqa: N802 (gRPC's naming)
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate,
            request_deserializer=parse_generate_request,
            response_serializer=sedac_pb2.GenerateResponse.SerializeToString,
        ),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream,
            request_deserializer=parse_generate_request,
            response_serializer=sedac_pb2.GenerateChunk.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

"""Optional API-key auth: ``Authorization: Bearer KEY`` over HTTP, the same as gRPC metadata.

The key comes from an environment variable (``SEDAC_API_KEY`` unless the config's
``api_key_env`` names another), never from the Serve config, so it does not appear in Serve's
stored config, dashboards or logs. Without the variable, auth is off.
"""

from __future__ import annotations

import hmac
import os

from sedac_ray.serve.errors import Unauthenticated


class ApiKeyAuth:
    def __init__(self, key: str | None):
        self._key = key.encode() if key else None

    @classmethod
    def from_env(cls, variable: str, required: bool = False) -> ApiKeyAuth:
        key = os.environ.get(variable, "").strip()
        if required and not key:
            raise ValueError(f"require_api_key is set but the environment variable {variable} is empty")
        return cls(key or None)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Raise :class:`Unauthenticated` unless ``authorization`` is ``Bearer <the key>``."""
        if self._key is None:
            return
        if not authorization:
            raise Unauthenticated("missing API key: send the header `Authorization: Bearer <key>`")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._key):
            raise Unauthenticated("invalid API key")

    def __repr__(self) -> str:  # never show the key
        return f"ApiKeyAuth(enabled={self.enabled})"


def grpc_authorization(grpc_context) -> str | None:
    """The ``authorization`` metadata value of a gRPC call, if any."""
    if grpc_context is None:
        return None
    for key, value in grpc_context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value
    return None

"""What every client of the library does with its target: a channel of its own (host:port:
`open_channel`, with the retry policy, TLS when `tls` has a client side, and the bearer
token on every call) or one the caller owns, and closing only its own."""

from __future__ import annotations

from typing import Any, Self

import grpc

from idealrt.core.grpc_client import DEFAULT_TIMEOUT_S, Token, open_channel, with_token
from idealrt.core.tls import TlsConfig

__all__ = ["ClientChannel"]


class ClientChannel:
    """The base of the four clients: `self._channel`, `self.timeout`, and `self._stub`,
    the service's generated stub (`_STUB`) on that channel."""

    _STUB: Any = None

    def __init__(
        self,
        target: str | grpc.Channel,
        timeout: float = DEFAULT_TIMEOUT_S,
        *,
        tls: TlsConfig | None = None,
        token: Token | None = None,
    ) -> None:
        """`target`: host:port (a channel of our own: TLS when `tls` has a client side,
        idealrt.core.tls) or a channel the caller owns. `token`: a bearer token (or what
        returns the current one) sent on every call."""
        self._own = isinstance(target, str)
        self._channel = open_channel(target, tls) if isinstance(target, str) else target
        self._channel = with_token(self._channel, token)
        self.timeout = timeout
        self._stub = self._STUB(self._channel)

    def close(self) -> None:
        if self._own:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

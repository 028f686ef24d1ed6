"""Connection limits for uvicorn that it lacks itself: a deadline for a request's headers.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive``, but a client that opens
a connection and then sends nothing, or dribbles the request line and headers a byte at a time,
holds it (and a slot of ``limit_concurrency``) forever ("slowloris"). :func:`h11_protocol` gives an
h11 protocol class that closes such a connection once ``header_timeout_s`` seconds have passed
without a complete request line and headers, counted from the moment the connection opened or
the previous response was sent. Once a request's headers are in, the deadline no longer applies:
the body has the application's own limit (``Settings.request_timeout_s``) and a response may take
as long as it needs. A client whose partial request is cut off gets a bare
``408 Request Timeout`` before the close; an idle connection is just closed.
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("medseg.service.http")

_TIMEOUT_BODY = b"request headers not received in time\n"
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY)
)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline, ``header_timeout_s`` (seconds), for the request
    line and headers of each request on the connection (see the module docstring)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol / uvicorn hooks: re-check the deadline after every event that can change
    # whether the connection is waiting for a request's headers
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._sync_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._sync_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        """No request is being handled: the connection is new, or its last response is sent."""
        return self.cycle is None or self.cycle.response_complete

    def _sync_header_timer(self) -> None:
        if self.transport is None or self.transport.is_closing() or not self._waiting_for_headers():
            self._cancel_header_timer()
        elif self._header_timer is None:  # keep the deadline already running: bytes don't reset it
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        partial = self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0])
        log.info(
            "connection closed: request headers not received in time",
            extra={"timeout_s": self.header_timeout_s, "partial": partial},
        )
        if partial:
            self.transport.write(_TIMEOUT_RESPONSE)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:
            pass
        self.transport.close()


def h11_protocol(header_timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """A :class:`HeaderTimeoutH11Protocol` class with this header deadline (seconds), to pass to
    uvicorn as ``http=``."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(header_timeout_s)})

"""A client connection as the server wants it, around uvicorn's HTTP protocol: own asyncio code.

uvicorn has no setting for a deadline on a request's head, nor for answering a client that half-closed
its socket after sending its request (`shutdown(SHUT_WR)`, as `nc -N` does). `GuardedConnection` adds
both around uvicorn's protocol without subclassing it or reading its state: it forwards every asyncio
event, reads the client's bytes a second time with h11, and hears from `track_responses` (an ASGI
wrapper) when each response starts and ends. `serve.make_server` puts the two together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11

Peer = tuple[str, int]  # a client's address, as the ASGI scope's "client" carries it


class GuardedConnection(asyncio.Protocol):
    """One client connection: `inner` (uvicorn's HTTP protocol) gets every asyncio event, and this adds:

    - A connection must deliver a complete request head within `read_timeout_s` of connecting or of
      the first byte of its next request; silent or trickling sockets are closed (between requests
      uvicorn's keep-alive timeout applies).
    - A client that sends its whole request and then shuts down its sending side (`shutdown(SHUT_WR)`)
      still gets its whole answer, then the connection closes. A shut-down side looks the same as a
      closed socket, so until the answer starts the server writes an interim `100 Continue` each
      second: a socket that is really closed answers it with a reset, and the request stops as for
      any disconnect. (HTTP/1.0 clients get no such probe, RFC 9110; a non-streaming answer to one
      that really left is computed for nobody.) A half-close in the middle of a request (its head,
      or a body short of its Content-Length or last chunk) closes the connection unanswered.
    """

    def __init__(self, inner: asyncio.Protocol, *, read_timeout_s: float, peers: dict[Peer, GuardedConnection]):
        self.inner, self.read_timeout_s, self.peers = inner, read_timeout_s, peers
        # The client's side of its current request; None once no further request can come (or a malformed one).
        self.reader: h11.Connection | None = h11.Connection(h11.SERVER)
        self.transport: Any = None
        self.peer: Peer | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.probe_timer: asyncio.TimerHandle | None = None
        self.requests = self.responses = 0  # requests read whole; responses sent whole
        self.answering = False  # a response has started and not ended
        self.close_after_answer = False  # the client half-closed: it can send nothing more
        self.http_10 = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and len(peer) >= 2:
            self.peer = (str(peer[0]), int(peer[1]))
            self.peers[self.peer] = self
        self.inner.connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        self._read(data)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        # Only with an address to be found by (a TCP client), else it would never hear its answer was sent.
        if self.peer is not None and not self._mid_request() and self.requests > self.responses:
            self.close_after_answer = True  # owed an answer: keep our sending side open until it is sent
            if not self.http_10 and not self.answering:
                self.probe_timer = asyncio.get_running_loop().call_later(1.0, self._probe)
            return True
        # Nothing asked, or a request cut short: returning None makes asyncio close the transport, and
        # uvicorn then tells the app's receive() http.disconnect, as for any other disconnect.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.head_timer, self.probe_timer):
            if timer is not None:
                timer.cancel()
        if self.peer is not None and self.peers.get(self.peer) is self:
            del self.peers[self.peer]
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def response_started(self) -> None:
        self.answering = True

    def response_sent(self) -> None:
        self.responses += 1
        self.answering = False
        if self.close_after_answer and self.responses >= self.requests:
            self.transport.close()  # after the answer's bytes are flushed

    # -- internals --------------------------------------------------------------------------------

    def _read(self, data: bytes) -> None:
        if self.reader is None:
            return
        try:
            self.reader.receive_data(data)
            while (event := self.reader.next_event()) not in (h11.NEED_DATA, h11.PAUSED):
                if isinstance(event, h11.Request):
                    self.http_10 = event.http_version == b"1.0"
                elif isinstance(event, h11.EndOfMessage):
                    self.requests += 1
                    rest, _ = self.reader.trailing_data  # a pipelined next request's first bytes
                    keep_alive = self.reader.their_state is not h11.MUST_CLOSE
                    self.reader = h11.Connection(h11.SERVER) if keep_alive else None
                    if self.reader is None:
                        break
                    if rest:  # (h11 reads b"" as the end of the connection)
                        self.reader.receive_data(rest)
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError:  # uvicorn answers it with a 400 and closes
            self.reader = None
        self._watch_head()

    def _awaiting_head(self) -> bool:
        return self.reader is not None and self.reader.their_state is h11.IDLE

    def _mid_request(self) -> bool:
        """Whether part of a request arrived: some of its head, or its head and not all of its body."""
        return self.reader is not None and (not self._awaiting_head() or bool(self.reader.trailing_data[0]))

    def _watch_head(self) -> None:
        """Time the head of a request that has begun (or of the first one, from connecting); stop once it is in."""
        started = self.requests == 0 or bool(self.reader is not None and self.reader.trailing_data[0])
        if not (self._awaiting_head() and started):
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None
        elif self.head_timer is None:
            self.head_timer = asyncio.get_running_loop().call_later(self.read_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self._awaiting_head() and not self.transport.is_closing():
            self.transport.close()

    def _probe(self) -> None:
        self.probe_timer = None
        if self.answering or self.responses >= self.requests or self.transport.is_closing():
            return
        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.probe_timer = asyncio.get_running_loop().call_later(1.0, self._probe)


def track_responses(app: Any, peers: dict[Peer, GuardedConnection]) -> Any:
    """`app`, telling each request's `GuardedConnection` (found by the client's address) when its
    response starts and when it has been sent whole."""

    async def tracked(scope: dict, receive: Callable, send: Callable) -> None:
        client = scope.get("client")
        connection = peers.get(tuple(client[:2])) if scope["type"] == "http" and client else None
        if connection is None:
            await app(scope, receive, send)
            return

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                connection.response_started()  # before writing: no probe may land inside the response
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                connection.response_sent()

        await app(scope, receive, send_tracked)

    return tracked

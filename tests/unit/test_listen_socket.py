"""The listening socket the CLI hands to uvicorn."""

from __future__ import annotations

import socket

from microserve.cli.serve import _bind


def test_listening_socket_is_tcp_with_nagle_off() -> None:
    # asyncio disables Nagle's algorithm on accepted connections only when the socket says it is TCP; without
    # that, each keep-alive response after the first stalled ~40 ms on a delayed ACK.
    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()

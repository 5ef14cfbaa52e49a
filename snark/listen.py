"""The listening socket, bound before anything slow happens.

``snark serve`` binds its port first and hands the socket to uvicorn: a port already in use is a
message in a second, not a model loaded for nothing and a bind error afterwards (uvicorn alone binds
only once the app has started).
"""

from __future__ import annotations

import errno
import socket

from snark.errors import ConfigError

_HOW = "pick another with --port or SNARK_PORT"


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``; connections wait in its backlog until uvicorn accepts
    them. Raises ``ConfigError`` naming the flag and the environment variable to change."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise ConfigError(
            f"Cannot listen on host {host!r} ({exc.strerror}): set --host or SNARK_HOST to an address of this "
            "machine (127.0.0.1 for this machine only, 0.0.0.0 for every interface)."
        ) from None
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may reuse the port while old connections linger in TIME_WAIT
    # (a port another process listens on stays refused).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen()  # now: two sockets with SO_REUSEADDR may both bind a port nobody listens on yet
    except OSError as exc:
        sock.close()
        raise ConfigError(_bind_problem(host, port, exc)) from None
    return sock


def _bind_problem(host: str, port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"Port {port} on {host} is already in use (another Snark, or another server, listens there): "
            f"stop it, or {_HOW}."
        )
    if exc.errno == errno.EACCES:
        return f"Port {port} needs privileges this process lacks: {_HOW} (above 1023)."
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f"{host} is not an address of this machine: set --host or SNARK_HOST "
            "(127.0.0.1, or 0.0.0.0 for every interface)."
        )
    return f"Cannot listen on {host}:{port} ({exc.strerror}): check --host/--port or SNARK_HOST/SNARK_PORT."

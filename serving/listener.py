"""The gateway's listening socket, handed from `stillhouse up` to each `stillhouse serve` it
starts (like systemd's socket activation): `up` binds the port once and keeps it, so while a
killed gateway is restarted the kernel queues new connections instead of refusing them, and
the restarted gateway answers them.

    listener = bind_listener("127.0.0.1", 8000)            # in `up`
    env = {**env, LISTEN_FD_ENV: str(listener.fileno())}   # the child inherits the fd
    sock = inherited_listener(os.environ)                  # in `serve`: None when not given
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

from stillhouse.common.config import GATEWAY_FD_ENV as LISTEN_FD_ENV
from stillhouse.common.errors import UsageError

BACKLOG = 1024  # connections the kernel holds while no gateway accepts (a restart)


def cannot_listen(host: str, port: int, exc: OSError) -> UsageError:
    """The one error for a gateway port that is taken or not ours to bind."""
    return UsageError(
        f"the gateway cannot listen on {host}:{port} ({exc.strerror}); "
        "choose another with --port or gateway.port"
    )


def check_port_free(host: str, port: int) -> None:
    """Fail before minutes of engine start-up, not after: the port is bound later."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise cannot_listen(host, port, exc) from None


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port that children inherit."""
    try:
        listener = socket.create_server((host, port), backlog=BACKLOG)
    except OSError as exc:
        raise cannot_listen(host, port, exc) from None
    listener.set_inheritable(True)
    return listener


def inherited_listener(environ: Mapping[str, str]) -> socket.socket | None:
    """The listening socket the parent handed over in `LISTEN_FD_ENV`, or None."""
    value = environ.get(LISTEN_FD_ENV)
    if not value:
        return None
    try:
        listener = socket.socket(fileno=int(value))
    except (ValueError, OSError) as exc:
        raise UsageError(f"{LISTEN_FD_ENV}={value!r} is not an open socket ({exc})") from None
    if (
        listener.type != socket.SOCK_STREAM
        or listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1
    ):
        listener.detach()  # not ours to close
        raise UsageError(f"{LISTEN_FD_ENV}={value!r} is not a listening TCP socket")
    return listener

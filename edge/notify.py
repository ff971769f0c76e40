"""systemd's notify protocol (READY, WATCHDOG, STOPPING, STATUS): a datagram to $NOTIFY_SOCKET.

Twelve lines instead of a dependency: the only maintained-looking packages for this are
unmaintained or pull in libsystemd bindings that need compiling on the Pi.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; False when not running under a notify unit."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)  # a busy or stuck receiver must never stall the agent
        try:
            sock.sendto(message.encode(), address)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the unit's WatchdogSec, in seconds, or None when no watchdog is configured for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6

"""sd_notify: tell systemd (Type=notify) the server's state, with no dependency.

`notify()` sends a state string ("READY=1", "STOPPING=1", "STATUS=...") to $NOTIFY_SOCKET as one
datagram; `notify_ready()` sends READY=1 only once the mount answers a stat, from a thread of its
own. Without $NOTIFY_SOCKET every call is a no-op.

What this module does not do: decide when the server is ready or stopping (zblock.daemon calls
these), or hold any lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

log = logging.getLogger("zblock.notify")

NOTIFY_READY_TIMEOUT = 120.0


def notify(state: str) -> bool:
    """Send `state` ("READY=1", "STOPPING=1", "STATUS=...") to $NOTIFY_SOCKET. False if unset.

    The protocol is one datagram on an AF_UNIX socket; a leading '@' names an abstract socket.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(5.0)
            s.sendto(state.encode(), addr)
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", state, os.environ.get("NOTIFY_SOCKET"), e)
        return False


def notify_ready(mountpoint: str, timeout: float = NOTIFY_READY_TIMEOUT) -> threading.Thread | None:
    """Send READY=1 once the mount answers. Returns at once (the waiting is a thread's).

    Call it from the FUSE init callback: the kernel holds every request until INIT is answered,
    so the stat cannot be done there (it would wait for its own caller). The thread stats
    MOUNTPOINT/stats, which only succeeds once libfuse serves requests, then notifies.
    No-op (None) without $NOTIFY_SOCKET.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    path = os.path.join(mountpoint, "stats")

    def wait_then_notify() -> None:
        # The stat itself cannot take a deadline; if it never returns, systemd's
        # TimeoutStartSec kills the server, which is the right outcome for a mount that
        # does not answer. The loop bounds the other failure (ENOENT/ENOTCONN while racing).
        deadline = time.monotonic() + timeout
        while True:
            try:
                os.stat(path)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    log.error("mount %s did not answer within %.0f s: %s; READY=1 not sent",
                              mountpoint, timeout, e)
                    return
                time.sleep(0.05)    # the mount appearing is outside this thread's control
        notify(f"READY=1\nSTATUS=serving {mountpoint}\nMAINPID={os.getpid()}")

    t = threading.Thread(target=wait_then_notify, name="zblock-notify", daemon=True)
    t.start()
    return t


def notify_stopping() -> bool:
    return notify("STOPPING=1")

"""A faster ``AssociationSocket.recv`` for pynetdicom.

pynetdicom reads every PDU in 4 KiB ``recv`` calls appended to a bytearray: a 10 MB image in 128 KiB PDUs
costs ~2,500 Python-level calls and as many re-allocations. This reads straight into one preallocated
buffer with ``recv_into`` and returns the same thing (a bytearray of what was read, short only when the peer
closed the connection), so the library's behaviour is otherwise unchanged. Installed once, by the listener.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom.transport import AssociationSocket

_CHUNK = 1 << 20  # bytes per recv_into call


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    sock: socket.socket = self.socket  # type: ignore[assignment]
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    nr_read = 0
    while nr_read < nr_bytes:
        received = sock.recv_into(view[nr_read:], min(_CHUNK, nr_bytes - nr_read))
        if not received:  # the peer closed the connection: return what arrived, like pynetdicom does
            view.release()
            del buffer[nr_read:]
            return buffer
        nr_read += received
    view.release()
    return buffer


_ORIGINAL: Any = AssociationSocket.recv


def install() -> None:
    """Replace ``AssociationSocket.recv`` (idempotent)."""
    AssociationSocket.recv = _recv  # type: ignore[method-assign]


def uninstall() -> None:
    """Restore pynetdicom's own ``recv``."""
    AssociationSocket.recv = _ORIGINAL  # type: ignore[method-assign]

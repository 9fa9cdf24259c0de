"""TCP_NODELAY on every DICOM connection fracwatch opens or accepts.

pynetdicom writes a C-STORE as two P-DATA PDUs (the command set, then the data set). With Nagle's algorithm
on, the second small write waits for the peer's acknowledgement of the first, which a Linux peer delays by up
to 40 ms: measured here, a pynetdicom C-STORE of a small SR to a local SCP took 48 ms, 6.5 ms with
TCP_NODELAY (DCMTK has the same stall without its ``TCP_NODELAY`` environment variable). Set from pynetdicom's
``EVT_CONN_OPEN`` event, as soon as the connection exists, for requested and accepted associations alike.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from pynetdicom import evt

LOGGER = logging.getLogger(__name__)


def _no_delay(event: evt.Event) -> None:
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not TCP (a test's socketpair), or already closed: Nagle stays on
        LOGGER.debug("TCP_NODELAY not set: %s", exc)


HANDLER: tuple[Any, Any] = (evt.EVT_CONN_OPEN, _no_delay)
"""The ``evt_handlers`` entry for ``AE.associate`` and ``AE.start_server``."""

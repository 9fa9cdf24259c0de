"""The recv_into replacement returns exactly what pynetdicom's own recv returns."""

from __future__ import annotations

import socket
import threading

from pynetdicom.transport import AssociationSocket

from fracwatch.dicom import fastrecv


class _Holder:
    """Just enough of an AssociationSocket: the functions only use ``self.socket``."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def _feed(sock: socket.socket, payload: bytes, close: bool) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(payload), 1000):  # many small segments: forces partial reads
            sock.sendall(payload[start : start + 1000])
        if close:
            sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_reads_exactly_the_requested_bytes() -> None:
    payload = bytes(range(256)) * 4000
    left, right = socket.socketpair()
    with left, right:
        feeder = _feed(left, payload, close=False)
        first = fastrecv._recv(_Holder(right), 300_000)  # type: ignore[arg-type]
        rest = fastrecv._recv(_Holder(right), len(payload) - 300_000)  # type: ignore[arg-type]
        feeder.join()
    assert isinstance(first, bytearray)
    assert bytes(first + rest) == payload


def test_peer_close_returns_what_arrived_like_pynetdicom() -> None:
    payload = b"x" * 5000
    for implementation in (fastrecv._recv, fastrecv._ORIGINAL):
        left, right = socket.socketpair()
        with left, right:
            feeder = _feed(left, payload, close=True)
            got = implementation(_Holder(right), 10_000)
            feeder.join()
        assert bytes(got) == payload


def test_install_and_uninstall() -> None:
    fastrecv.install()
    assert AssociationSocket.recv is fastrecv._recv
    fastrecv.uninstall()
    assert AssociationSocket.recv is fastrecv._ORIGINAL
    fastrecv.install()

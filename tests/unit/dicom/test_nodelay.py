"""TCP_NODELAY reaches both ends of a real association on 127.0.0.1 through pynetdicom's EVT_CONN_OPEN."""

from __future__ import annotations

import socket

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fracwatch.dicom import nodelay


def _option(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_requested_and_accepted_connections_get_tcp_nodelay() -> None:
    accepted: list[int] = []

    def on_echo(event: evt.Event) -> int:
        accepted.append(_option(event.assoc.dul.socket.socket))
        return 0x0000

    server_ae = AE("SCP")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[nodelay.HANDLER, (evt.EVT_C_ECHO, on_echo)]
    )
    try:
        port = server.socket.getsockname()[1]
        client_ae = AE("SCU")
        client_ae.add_requested_context(Verification)
        plain = client_ae.associate("127.0.0.1", port)  # without the handler: Nagle on, as pynetdicom leaves it
        assert plain.is_established and _option(plain.dul.socket.socket) == 0
        plain.send_c_echo()
        plain.release()
        tuned = client_ae.associate("127.0.0.1", port, evt_handlers=[nodelay.HANDLER])
        assert tuned.is_established and _option(tuned.dul.socket.socket) != 0
        assert int(tuned.send_c_echo().Status) == 0
        tuned.release()
    finally:
        server.shutdown()
    assert len(accepted) == 2 and all(value != 0 for value in accepted)  # the server's end, both times

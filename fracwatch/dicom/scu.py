"""Outbound DICOM: C-ECHO (and, in the scoring issue, C-STORE of results)."""

from __future__ import annotations

import logging

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fracwatch.errors import PeerError

LOGGER = logging.getLogger(__name__)


def echo(host: str, port: int, called_ae: str, calling_ae: str, timeout: float = 10.0) -> int:
    """C-ECHO ``called_ae`` at ``host:port``; return the status (0x0000 on success).

    Raises :class:`PeerError` when no association can be made.
    """
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PeerError(f"{called_ae}@{host}:{port} rejected the association from {calling_ae}")
        raise PeerError(f"no association with {called_ae}@{host}:{port}")
    try:
        response = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in response:
        raise PeerError(f"{called_ae}@{host}:{port} did not answer the C-ECHO")
    status = int(response.Status)
    LOGGER.info("C-ECHO %s@%s:%d: status 0x%04X", called_ae, host, port, status)
    return status

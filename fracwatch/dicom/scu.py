"""Outbound DICOM: C-ECHO, and C-STORE of fracwatch's results to a destination."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fracwatch.dicom import nodelay
from fracwatch.dicom import status as codes
from fracwatch.errors import PeerError

LOGGER = logging.getLogger(__name__)

REJECTED_PERMANENT = 0x01


@dataclass(frozen=True)
class Peer:
    """Where to send: the destination's AE title and address, and ours."""

    ae_title: str
    host: str
    port: int
    calling_ae: str
    timeout: float = 30.0
    max_pdu: int = 131072
    ssl_context: ssl.SSLContext | None = None


@dataclass(frozen=True)
class StoreOutcome:
    """What happened to one file: acknowledged, or failed transiently or permanently."""

    path: Path
    status: int | None
    error: str | None
    permanent: bool = False

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and codes.is_acknowledged(self.status)


def _ae(peer: Peer) -> AE:
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.network_timeout = peer.timeout
    ae.connection_timeout = peer.timeout
    ae.maximum_pdu_size = peer.max_pdu
    return ae


def echo(
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """C-ECHO ``called_ae`` at ``host:port``; return the status (0x0000 on success).

    Raises :class:`PeerError` when no association can be made.
    """
    ae = _ae(Peer(called_ae, host, port, calling_ae, timeout))
    ae.add_requested_context(Verification)
    tls_args = (ssl_context, host) if ssl_context is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args, evt_handlers=[nodelay.HANDLER])
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


@dataclass(frozen=True)
class Outgoing:
    """A Part 10 file to send and its SOP Class UID (known to the caller: no need to read the file for it)."""

    path: Path
    sop_class_uid: str


def store_files(peer: Peer, items: Sequence[Outgoing]) -> Iterator[StoreOutcome]:
    """C-STORE each file (sent as stored, not re-encoded) over one association; one outcome per file, yielded
    as soon as it is known — so the caller records an acknowledgement before the next file goes (a crash
    mid-batch then resends only the file in flight, not every file already acknowledged)."""
    if not items:
        return
    paths = [item.path for item in items]
    classes = [item.sop_class_uid for item in items]
    ae = _ae(peer)
    for sop_class in sorted(set(classes)):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{peer.ae_title}@{peer.host}:{peer.port}"
    tls_args = (peer.ssl_context, peer.host) if peer.ssl_context is not None else None
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args, evt_handlers=[nodelay.HANDLER]
    )
    if not assoc.is_established:
        permanent = bool(assoc.is_rejected and getattr(assoc.acceptor.primitive, "result", None) == REJECTED_PERMANENT)
        reason = "rejected the association permanently" if permanent else "could not be associated with"
        for path in paths:
            yield StoreOutcome(path, None, f"{where} {reason}", permanent=permanent)
        return
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        for path, sop_class in zip(paths, classes, strict=True):
            yield _store_one(assoc, where, path, sop_class, accepted)
    finally:
        if assoc.is_established:
            assoc.release()


def _store_one(assoc: Association, where: str, path: Path, sop_class: str, accepted: set[str]) -> StoreOutcome:
    if sop_class not in accepted:
        return StoreOutcome(path, None, f"{where} does not accept SOP class {sop_class}", True)
    if not assoc.is_established:
        return StoreOutcome(path, None, f"association with {where} ended", False)
    response = assoc.send_c_store(path)
    if "Status" not in response:
        return StoreOutcome(path, None, f"no C-STORE response from {where}", False)
    code = int(response.Status)
    if codes.is_acknowledged(code):
        return StoreOutcome(path, code, None)
    transient = codes.is_transient_failure(code)
    return StoreOutcome(path, code, f"{where} answered 0x{code:04X}", permanent=not transient)

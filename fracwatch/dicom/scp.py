"""The DICOM listener: C-ECHO and C-STORE for every storage SOP class and transfer syntax pynetdicom knows.

A C-STORE is answered 0x0000 only after the instance is fsynced into the spool *and* recorded by the sink.
Handlers run on association threads; they write and record, nothing heavier.
"""

from __future__ import annotations

import errno
import io
import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from fracwatch.dicom import fastrecv, nodelay, status
from fracwatch.dicom.header import header_from_stream
from fracwatch.dicom.spool import Spool
from fracwatch.domain import InstanceHeader, ReceivedInstance, RecordOutcome
from fracwatch.errors import InvalidInstanceError, SpoolError

LOGGER = logging.getLogger(__name__)


class InstanceSink(Protocol):
    """Where the SCP hands a durably written instance (the service wires the database in)."""

    def is_held(self, header: InstanceHeader) -> bool:
        """True if this SOP Instance is already stored (a resend needs no new write)."""
        ...

    def record(self, received: ReceivedInstance) -> RecordOutcome:
        """Record the instance; raise on failure (the SCP then answers 0xA700)."""
        ...


@dataclass(frozen=True)
class ListenerOptions:
    """How the listener presents itself on the network.

    ``allowed_calling_aets`` entries are ``AE`` (from any address) or ``AE@ADDRESS`` (only from that IP address);
    empty means every caller is accepted.
    """

    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...] = ()
    ssl_context: ssl.SSLContext | None = None
    max_pdu: int = 131072
    max_associations: int = 16
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 120.0
    reuse_port: bool = False  # SO_REUSEPORT: several receiver processes share the port (the kernel spreads them)


def _file_meta_bytes(event: Event, header: InstanceHeader, calling_ae: str) -> bytes:
    """Preamble, prefix and file meta for the dataset as received, naming the sending AE."""
    meta = FileMetaDataset(event.file_meta)
    meta.MediaStorageSOPClassUID = UID(header.sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(header.sop_instance_uid)
    meta.SourceApplicationEntityTitle = calling_ae
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue()


def handle_store(event: Event, spool: Spool, sink: InstanceSink) -> int:
    """Write the C-STORE dataset as received (no decode) durably, record it, answer a DICOM status."""
    request = cast(C_STORE, event.request)
    calling_ae = str(event.assoc.requestor.ae_title).strip()
    transfer_syntax = str(event.context.transfer_syntax)
    stream = cast(io.BytesIO, request.DataSet)
    affected_uid = str(request.AffectedSOPInstanceUID).strip()
    try:
        stream.seek(0)
        header = header_from_stream(stream, transfer_syntax, str(request.AffectedSOPClassUID))
    except InvalidInstanceError as exc:
        LOGGER.warning("rejecting C-STORE of %s from %s: %s", affected_uid, calling_ae, exc)
        return status.CANNOT_UNDERSTAND
    if header.sop_instance_uid != affected_uid:
        LOGGER.warning(
            "C-STORE from %s: Affected SOP Instance UID %s differs from the dataset's %s; using the dataset's",
            calling_ae,
            affected_uid,
            header.sop_instance_uid,
        )
    path = spool.path_for(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
    try:
        # Only a file already at this path can be a resend: new instances skip the database lookup.
        if path.exists() and sink.is_held(header):
            LOGGER.info("instance %s from %s already held; acknowledged", header.sop_instance_uid, calling_ae)
            return status.SUCCESS
    except Exception:
        LOGGER.exception("cannot look up instance %s", header.sop_instance_uid)
        return status.OUT_OF_RESOURCES

    try:
        size = spool.write(path, (_file_meta_bytes(event, header, calling_ae), stream.getbuffer()))
    except SpoolError as exc:
        LOGGER.error("refusing instance %s from %s: %s", header.sop_instance_uid, calling_ae, exc)
        return status.OUT_OF_RESOURCES
    received = ReceivedInstance(
        header=header, path=path, size_bytes=size, calling_ae=calling_ae, received_at=datetime.now(UTC)
    )
    try:
        outcome = sink.record(received)
    except Exception:
        # The file is safe on disk; the reconciler registers it at the next start if the sender gives up.
        LOGGER.exception("cannot record instance %s from %s", header.sop_instance_uid, calling_ae)
        return status.OUT_OF_RESOURCES
    LOGGER.info(
        "stored %s (study %s v%d, %d bytes) from %s",
        header.sop_instance_uid,
        header.study_instance_uid,
        outcome.study_version,
        size,
        calling_ae,
    )
    return status.SUCCESS


def handle_echo(event: Event) -> int:
    """Answer C-ECHO."""
    LOGGER.info("C-ECHO from %s", str(event.assoc.requestor.ae_title).strip())
    return status.SUCCESS


def is_allowed(allowed: tuple[str, ...], calling_ae: str, address: str) -> bool:
    """Whether ``calling_ae`` connecting from ``address`` passes the allow-list (empty = everyone)."""
    if not allowed:
        return True
    for entry in allowed:
        title, _, source = entry.partition("@")
        if title.strip() == calling_ae and (not source or source.strip() == address):
            return True
    return False


def handle_requested(event: Event, allowed: tuple[str, ...]) -> None:
    """Log every association request; reject callers the allow-list does not name (calling AE not recognised)."""
    primitive = event.assoc.requestor.primitive
    calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
    address = str(event.assoc.requestor.address)
    if is_allowed(allowed, calling, address):
        LOGGER.info("association requested by %s at %s", calling, address)
        return
    LOGGER.warning("rejecting association from calling AE %s at %s: not in the allow-list", calling, address)
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected-permanent, service user, calling AE not recognised
    event.assoc.kill()


# Why an association was aborted, noted when ACSE receives the abort (EVT_ACSE_RECV fires before EVT_ABORTED).
_ABORT_REASONS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_PROVIDER_REASONS = {
    0x00: "the connection closed without a release, or the peer's provider aborted (reason not specified)",
    0x01: "an unrecognised PDU",
    0x02: "an unexpected PDU",
    0x04: "an unrecognised PDU parameter",
    0x05: "an unexpected PDU parameter",
    0x06: "an invalid PDU parameter value",
}


def _note_abort(event: Event) -> None:
    primitive = getattr(event, "primitive", None)  # EVT_ACSE_RECV carries it
    if isinstance(primitive, A_ABORT):
        _ABORT_REASONS[event.assoc] = "the calling AE sent A-ABORT"
    elif isinstance(primitive, A_P_ABORT):
        reason = _PROVIDER_REASONS.get(primitive.provider_reason or 0, f"reason {primitive.provider_reason}")
        _ABORT_REASONS[event.assoc] = f"A-P-ABORT: {reason}"


def _log_aborted(event: Event) -> None:
    reason = _ABORT_REASONS.pop(event.assoc, "aborted here (a network or DIMSE timeout, or the listener stopping)")
    LOGGER.warning("association with %s aborted: %s", str(event.assoc.requestor.ae_title).strip(), reason)


def build_ae(options: ListenerOptions) -> AE:
    """An application entity accepting every storage SOP class with every transfer syntax, plus C-ECHO."""
    fastrecv.install()
    ae = AE(ae_title=options.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(cast(str, context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = options.max_pdu
    ae.maximum_associations = options.max_associations
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    return ae


class SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT set before the bind: every receiver process on this host
    that sets it listens on the same port, and the kernel spreads incoming connections across them (Linux; where
    the OS lacks it the bind fails with a clear error)."""

    def server_bind(self) -> None:
        reuse_port = getattr(socket, "SO_REUSEPORT", None)
        if reuse_port is None:
            raise OSError(errno.ENOPROTOOPT, "this OS has no SO_REUSEPORT: receivers cannot share a port")
        listening = self.socket
        assert listening is not None  # socketserver made it in __init__, before the bind
        listening.setsockopt(socket.SOL_SOCKET, reuse_port, 1)
        super().server_bind()


class StorageSCP:
    """A running storage listener; ``start`` binds, ``stop`` drains in-flight associations."""

    def __init__(self, options: ListenerOptions, spool: Spool, sink: InstanceSink) -> None:
        self.options = options
        self.spool = spool
        self.sink = sink
        self._ae = build_ae(options)
        self._server: ThreadedAssociationServer | None = None
        self._storing: set[int] = set()  # ids of the associations whose C-STORE handler is running
        self._storing_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the port is the real one when 0 was asked for."""
        if self._server is None:
            raise RuntimeError("listener not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def running(self) -> bool:
        """True while the listener accepts associations."""
        return self._server is not None

    def start(self) -> None:
        """Bind and serve in background threads."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_REQUESTED, handle_requested, [self.options.allowed_calling_aets]),
            (evt.EVT_ACSE_RECV, _note_abort),
            (evt.EVT_ABORTED, _log_aborted),
            nodelay.HANDLER,
        ]
        address = (self.options.host, self.options.port)
        if self.options.reuse_port:
            self._server = self._ae.make_server(
                address, evt_handlers=handlers, ssl_context=self.options.ssl_context, server_class=SharedPortServer
            )
            threading.Thread(target=self._server.serve_forever, name="fracwatch-listener", daemon=True).start()
        else:
            self._server = self._ae.start_server(
                address, block=False, evt_handlers=handlers, ssl_context=self.options.ssl_context
            )
        tls = " (TLS)" if self.options.ssl_context is not None else ""
        shared = " (port shared with other receivers)" if self.options.reuse_port else ""
        LOGGER.info("listening as %s on %s:%d%s%s", self.options.ae_title, *self.address, tls, shared)

    def _handle_store(self, event: Event) -> int:
        key = id(event.assoc)
        with self._storing_lock:
            self._storing.add(key)
        try:
            return handle_store(event, self.spool, self.sink)
        finally:
            with self._storing_lock:
                self._storing.discard(key)

    def _busy(self, assoc: Any) -> bool:
        """True while a message is arriving on the association or its C-STORE is being written and recorded."""
        with self._storing_lock:
            storing = id(assoc) in self._storing
        return storing or assoc.dimse.message is not None or not assoc.dimse.msg_queue.empty()

    def stop(self, grace: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        """Stop accepting associations, let in-flight transfers finish for ``grace`` seconds, then abort.

        An association with nothing in flight — idle between requests, or a connection that never sent its
        A-ASSOCIATE-RQ — is aborted at once, so a stop does not wait out its timeouts. Handlers already inside a
        C-STORE finish their write and record before their thread ends.
        """
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        deadline = clock() + grace
        in_flight = list(self._ae.active_associations)
        while in_flight and clock() < deadline:
            for assoc in list(in_flight):
                if not assoc.is_alive():
                    in_flight.remove(assoc)
                elif not self._busy(assoc):
                    # its socket is closed now; a thread still waiting out an ACSE timeout holds nothing
                    assoc.abort()
                    in_flight.remove(assoc)
            time.sleep(0.05)
        for assoc in in_flight:
            if assoc.is_alive():
                LOGGER.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
                assoc.abort()
                assoc.join(timeout=10.0)
        LOGGER.info("listener stopped")

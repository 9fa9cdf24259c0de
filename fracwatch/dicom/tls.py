"""TLS contexts for the DICOM listener and sender (PS3.15 Annex B.9 style: TLS 1.2+, optional mutual auth)."""

from __future__ import annotations

import ssl
from pathlib import Path

from fracwatch.errors import ConfigError


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The listener's context; with ``client_ca``, peers must present a certificate signed by it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))
        if client_ca is not None:
            context.load_verify_locations(cafile=str(client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"invalid setting 'tls_cert'/'tls_key'/'tls_ca': {exc}") from exc
    return context


def client_context(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """The sender's context: verify the destination against ``ca`` (else the system store); optional client cert."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert is not None and key is not None:
            context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"invalid setting 'tls_cert'/'tls_key': {exc}") from exc
    return context

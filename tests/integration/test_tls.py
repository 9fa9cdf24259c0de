"""DICOM TLS on the listener and the sender, with a CA and certificates generated here; per-source allow-list."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from fracwatch.daemon import RunningDaemon
from fracwatch.dicom import tls
from fracwatch.dicom.scu import echo
from fracwatch.errors import PeerError
from tests import dicomgen
from tests.conftest import FakeClock, echo_status, free_port

pytestmark = pytest.mark.timeout(120)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path.with_suffix(".crt"), path.with_suffix(".key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    root = tmp_path_factory.mktemp("pki")
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fracwatch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths: dict[str, Path] = {}
    paths["ca"], _ = _write(root / "ca", ca, ca_key)
    server_and_client = [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
    for name, usage in (("server", server_and_client), ("client", [x509.ExtendedKeyUsageOID.CLIENT_AUTH])):
        key = _key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{name}_cert"], paths[f"{name}_key"] = _write(root / name, cert, key)
    return paths


def test_listener_requires_tls_and_a_client_certificate(
    start_daemon: Callable[..., RunningDaemon], pki: dict[str, Path], tmp_path: Path
) -> None:
    daemon = start_daemon(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"])
    port = daemon.scp.address[1]
    client = tls.client_context(pki["ca"], pki["client_cert"], pki["client_key"])
    assert echo("127.0.0.1", port, "FRACWATCH", "MODALITY", ssl_context=client) == 0
    # a plain TCP caller never gets an association
    assert echo_status(port) is None
    # a TLS caller without a client certificate is refused by the handshake
    anonymous = tls.client_context(pki["ca"])
    with pytest.raises(PeerError):
        echo("127.0.0.1", port, "FRACWATCH", "MODALITY", timeout=5, ssl_context=anonymous)

    path = dicomgen.save(dicomgen.image(dicomgen.StudyIds()), tmp_path / "a.dcm")
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(dicomgen.DX_PRESENTATION, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACWATCH", tls_args=(client, "127.0.0.1"))
    assert assoc.is_established
    assert int(assoc.send_c_store(path).Status) == 0
    assoc.release()


def test_results_are_sent_over_tls(
    start_daemon: Callable[..., RunningDaemon], pki: dict[str, Path], tmp_path: Path, clock: FakeClock
) -> None:
    received = []
    server_side = tls.server_context(pki["server_cert"], pki["server_key"], pki["ca"])
    pacs = AE(ae_title="PACS")
    for context in AllStoragePresentationContexts:
        pacs.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    port = free_port()

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0

    server = pacs.start_server(
        ("127.0.0.1", port), block=False, ssl_context=server_side, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        daemon = start_daemon(
            destinations=[f"PACS@127.0.0.1:{port}"],
            destination_tls=True,
            destination_ca=pki["ca"],
            tls_cert=pki["server_cert"],  # fracwatch's certificate: server for the listener, client when sending
            tls_key=pki["server_key"],
        )
        source = dicomgen.save(dicomgen.image(dicomgen.StudyIds(), rows=200, columns=200), tmp_path / "a.dcm")
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(dicomgen.DX_PRESENTATION, "1.2.840.10008.1.2.1")
        client = tls.client_context(pki["ca"], pki["client_cert"], pki["client_key"])
        assoc = ae.associate("127.0.0.1", daemon.scp.address[1], tls_args=(client, "127.0.0.1"))
        assert int(assoc.send_c_store(source).Status) == 0
        assoc.release()
        clock.advance(60)
        daemon.detect_once()
        assert daemon.worker.wait_idle(60)
        daemon.deliver_once()
    finally:
        server.shutdown()
    assert len(received) == 1
    assert received[0].StudyInstanceUID == dcmread(source).StudyInstanceUID


def test_bad_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    from fracwatch.errors import ConfigError

    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="tls_cert"):
        tls.server_context(missing, missing)


def test_allow_list_by_ae_and_source_address(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(allowed_calling_aets=["MODALITY@127.0.0.1", "PACS@10.9.9.9"])
    port = daemon.scp.address[1]
    assert echo_status(port, "MODALITY") == 0
    assert echo_status(port, "PACS") is None  # right AE title, wrong source address
    assert echo_status(port, "OTHER") is None


def test_ssl_default_is_tls12_or_newer(pki: dict[str, Path]) -> None:
    context = tls.server_context(pki["server_cert"], pki["server_key"])
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2

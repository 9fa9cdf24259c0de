"""Triage end to end: a positive study raises a worklist flag, an HL7 ORU^R01 reaches a real MLLP listener and a
FHIR-shaped webhook reaches a real HTTP receiver, both with a failed first attempt that is retried; metrics and
the worklist are read over the daemon's own HTTP port."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7
import httpx
import pytest
from hl7.mllp import start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.uid import generate_uid
from sqlalchemy import select

from fracwatch.daemon import RunningDaemon
from fracwatch.service.queries import create_token
from fracwatch.store.models import Study, StudyResult, TriageMessage
from tests import dicomgen
from tests.conftest import FakeClock, free_port, send_files
from tests.integration.test_scoring import complete

pytestmark = pytest.mark.timeout(180)


class MllpListener:
    """A real MLLP server (python-hl7's asyncio server) on loopback; answers with the queued ACK codes."""

    def __init__(self, codes: list[str]) -> None:
        self.codes = codes
        self.messages: list[hl7.Message] = []
        self.received = threading.Semaphore(0)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.messages.append(message)
                code = self.codes.pop(0) if self.codes else "AA"
                writer.writemessage(message.create_ack(code))
                await writer.drain()
                self.received.release()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(start_hl7_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    def __enter__(self) -> MllpListener:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@contextmanager
def webhook_receiver(statuses: list[int]) -> Iterator[tuple[str, list[dict[str, Any]], threading.Semaphore]]:
    """A real HTTP server on loopback that answers POSTs with the queued statuses (then 200)."""
    bodies: list[dict[str, Any]] = []
    received = threading.Semaphore(0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            bodies.append({"json": json.loads(body), "headers": dict(self.headers)})
            self.send_response(statuses.pop(0) if statuses else 200)
            self.end_headers()
            received.release()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/fhir/triage", bodies, received
    finally:
        server.shutdown()


def fractured_study(directory: Path) -> tuple[dicomgen.StudyIds, list[Path]]:
    ids = dicomgen.StudyIds(accession="ACC-TRIAGE-7")
    series = str(generate_uid())
    directory.mkdir(parents=True, exist_ok=True)
    files = [
        dicomgen.save(dicomgen.phantom_image(ids, seed, fractured, series), directory / f"{seed}.dcm")
        for seed, fractured in ((901, True), (902, False))
    ]
    return ids, files


def test_positive_study_is_flagged_and_messaged_with_retries(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FRACWATCH_WEBHOOK_TOKEN", "hook-secret")
    with MllpListener(["AE"]) as ris, webhook_receiver([503]) as (url, bodies, hook_received):
        daemon = start_daemon(triage_hl7=[f"127.0.0.1:{ris.port}"], triage_webhooks=[url], retry_base=30)
        ids, files = fractured_study(tmp_path / "src")
        assert send_files(daemon.scp.address[1], files) == [0, 0]
        complete(daemon, clock)  # scoring kicks the triage sender
        assert ris.received.acquire(timeout=30) and hook_received.acquire(timeout=30)
        with daemon.sessions() as session:
            result = session.scalars(select(StudyResult)).one()
            study = session.scalars(select(Study)).one()
        assert result.category == "positive" and study.triage_priority == "positive"
        daemon.send_triage_once()  # not due yet: nothing is sent again
        clock.advance(31)
        daemon.send_triage_once()
        assert ris.received.acquire(timeout=30) and hook_received.acquire(timeout=30)
        clock.advance(3600)
        daemon.send_triage_once()  # both accepted: never sent again

        settings = daemon.settings
        token = create_token(settings, "ris-admin", "viewer")
        base = f"http://127.0.0.1:{settings.http_port}"
        worklist = httpx.get(f"{base}/api/worklist", headers={"Authorization": f"Bearer {token}"}).json()["items"]
        metrics = httpx.get(f"{base}/metrics").text

    assert len(ris.messages) == 2 and len(bodies) == 2
    with daemon.sessions() as session:
        messages = session.scalars(select(TriageMessage).order_by(TriageMessage.channel)).all()
    assert [(m.channel, m.state, m.attempts, m.ack_code) for m in messages] == [
        ("hl7", "sent", 2, "AA"),
        ("webhook", "sent", 2, "200"),
    ]

    oru = ris.messages[-1]
    assert str(oru.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(oru.segment("MSH")[10]) == messages[0].control_id
    assert str(oru.segment("PID")[3][0][0]) == ids.patient_id  # from the spooled source, not the database
    assert str(oru.segment("PID")[5]) == ids.patient_name  # PID-5 is required (it was empty)
    for message in ris.messages:  # every message passes hl7apy's strict v2.5 validation
        parse_message(str(message).replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT).validate()
    obr = oru.segment("OBR")
    assert str(obr[3]) == ids.accession and str(obr[5]) == "S"  # stat
    assert str(obr[18]) == ids.study_uid
    finding, probability = oru.segments("OBX")
    assert str(finding[5][0][0]) == "125605004" and str(finding[8]) == "POS"
    assert float(str(probability[5])) == pytest.approx(result.probability, abs=1e-4)

    bundle = bodies[-1]["json"]
    assert bodies[-1]["headers"]["Authorization"] == "Bearer hook-secret"
    report, observation = (entry["resource"] for entry in bundle["entry"])
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "125605004"
    assert report["subject"]["identifier"]["value"] == ids.patient_id
    assert report["basedOn"][0]["identifier"]["value"] == ids.accession
    assert observation["valueQuantity"]["value"] == pytest.approx(result.probability, abs=1e-4)
    assert report["result"][0]["reference"] == bundle["entry"][1]["fullUrl"]

    assert [w["study_instance_uid"] for w in worklist] == [ids.study_uid]
    assert 'fracwatch_studies_scored_total{category="positive"} 1.0' in metrics
    assert 'fracwatch_instances_received_total{outcome="stored"} 2.0' in metrics
    assert 'fracwatch_triage_messages_total{channel="hl7",outcome="retry"} 1.0' in metrics
    assert 'fracwatch_triage_messages_total{channel="webhook",outcome="sent"} 1.0' in metrics
    assert "fracwatch_scoring_latency_seconds_count 1.0" in metrics
    assert "fracwatch_queue_depth 0.0" in metrics
    db_bytes = Path(daemon.settings.data_dir / "fracwatch.db").read_bytes()
    assert ids.patient_id.encode() not in db_bytes


def test_rejected_message_goes_to_dead_letter(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock
) -> None:
    with MllpListener(["AR"]) as ris, webhook_receiver([400]) as (url, _bodies, hook_received):
        daemon = start_daemon(triage_hl7=[f"127.0.0.1:{ris.port}"], triage_webhooks=[url])
        _, files = fractured_study(tmp_path / "src")
        send_files(daemon.scp.address[1], files)
        complete(daemon, clock)
        assert ris.received.acquire(timeout=30) and hook_received.acquire(timeout=30)
        daemon.send_triage_once()
    with daemon.sessions() as session:
        states = session.execute(
            select(TriageMessage.channel, TriageMessage.state, TriageMessage.attempts).order_by(TriageMessage.channel)
        ).all()
    assert [tuple(s) for s in states] == [("hl7", "dead", 1), ("webhook", "dead", 1)]

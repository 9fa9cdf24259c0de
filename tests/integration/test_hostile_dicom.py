"""A seeded corpus of 320 malformed DICOM instances (tests/corpus.py) sent over the network to a running daemon
(SQLite and PostgreSQL): the daemon stays up, and every instance is either refused with a failure status or
recorded — and then scored, or given a reason (an image error, a dead letter, not a scorable image). A valid
study sent after the corpus is still scored.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import func, select

from fracwatch.daemon import RunningDaemon
from fracwatch.store.models import ImageResult, Instance, Study
from tests import corpus, dicomgen
from tests.conftest import FakeClock, echo_status, send_files

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture
def raw_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's SCU sends a file's dataset bytes as they are, instead of decoding and re-encoding them."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def send_corpus(port: int, paths: list[Path]) -> dict[Path, int]:
    """C-STORE each file as its bytes are (the file meta names the SOP class and syntax); a new association
    whenever the daemon aborted one. The status per file (-1: no response)."""
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    metas = {path: read_file_meta_info(path) for path in paths}
    for context in {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas.values()}:
        ae.add_requested_context(*context)
    statuses: dict[Path, int] = {}
    assoc = None
    for path in paths:
        if assoc is None or not assoc.is_established:
            assoc = ae.associate("127.0.0.1", port, ae_title="FRACWATCH")
            assert assoc.is_established, "the daemon stopped accepting associations"
        response = assoc.send_c_store(path)
        statuses[path] = int(response.Status) if "Status" in response else -1
    if assoc is not None and assoc.is_established:
        assoc.release()
    return statuses


def test_a_corpus_of_malformed_instances_is_refused_or_recorded_with_a_reason(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path, clock: FakeClock, db_url: str, raw_sends: None
) -> None:
    daemon = start_daemon(db_url=db_url)
    port = daemon.scp.address[1]
    paths = corpus.generate(tmp_path / "corpus")
    assert len(paths) >= 300
    statuses = send_corpus(port, paths)
    assert echo_status(port) == 0  # still up

    acknowledged = [path for path, code in statuses.items() if code == 0 or 0xB000 <= code <= 0xBFFF]
    refused = {path: code for path, code in statuses.items() if path not in acknowledged}
    assert all(code == -1 or code >= 0xA000 for code in refused.values()), Counter(refused.values())
    assert acknowledged and refused  # the corpus holds both kinds
    kinds = Counter((path.stem.split("-", 1)[1], "acked" if path in acknowledged else "refused") for path in paths)
    print("corpus outcomes:", dict(sorted(kinds.items())))  # in the CI log, for the record

    valid = dicomgen.StudyIds(accession="AFTER")
    after = [dicomgen.save(dicomgen.image(valid, seed=n), tmp_path / f"after{n}.dcm") for n in range(2)]
    assert send_files(port, after) == [0, 0]

    clock.advance(daemon.settings.stable_after + 1)
    daemon.detect_once()
    assert daemon.worker.wait_idle(400), "scoring did not finish"

    with daemon.sessions() as session:
        rows = session.execute(select(Instance.id, Instance.scorable, Instance.study_id)).all()
        assert len(rows) == len(acknowledged) + len(after)  # every acknowledged instance kept (UIDs are distinct)
        images = {i.instance_id: i for i in session.scalars(select(ImageResult))}
        studies = {s.id: s for s in session.scalars(select(Study))}
        unaccounted = []
        for row in rows:
            study = studies[row.study_id]
            image = images.get(row.id)
            scored = image is not None and (image.probability is not None or bool(image.error))
            dead = study.state == "failed" and bool(study.failure_reason)
            if row.scorable and not (scored or dead):
                unaccounted.append((row.id, study.state))
        assert unaccounted == [], f"{len(unaccounted)} recorded instances with neither a score nor a reason"
        (after_study,) = [s for s in studies.values() if s.study_instance_uid == valid.study_uid]
        assert after_study.state == "scored"
        scored_after = session.scalar(
            select(func.count(ImageResult.id))
            .join(Instance, Instance.id == ImageResult.instance_id)
            .where(Instance.study_id == after_study.id, ImageResult.probability.is_not(None))
        )
        assert scored_after == 2  # the valid study behind the corpus was scored

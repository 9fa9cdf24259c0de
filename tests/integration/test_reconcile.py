"""The start-up reconciler registers spool files whose database row was never committed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from fracwatch.config import Settings
from fracwatch.daemon import Daemon
from fracwatch.dicom.spool import Spool
from fracwatch.store.models import Instance
from tests import dicomgen


def test_orphan_spool_files_are_registered_at_start(
    make_settings: Callable[..., Settings], tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(db_url=db_url)
    spool = Spool(settings.spool_dir)
    spool.prepare()
    ids = dicomgen.StudyIds()
    source = dicomgen.save(dicomgen.image(ids), tmp_path / "a.dcm")
    ds = dcmread(source, stop_before_pixels=True)
    # as if the process died between the rename into the spool and the database commit
    orphan = spool.path_for(ids.study_uid, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    orphan.parent.mkdir(parents=True)
    shutil.copyfile(source, orphan)
    (settings.spool_dir / "junk").mkdir()
    (settings.spool_dir / "junk" / "broken.dcm").write_bytes(b"not dicom")
    (spool.tmp_dir / "tmpabc.part").write_bytes(b"half a file")

    daemon = Daemon(settings).start()
    try:
        with daemon.sessions() as session:
            rows = session.scalars(select(Instance)).all()
        assert [(r.sop_instance_uid, r.path) for r in rows] == [(ds.SOPInstanceUID, str(orphan))]
        assert list(spool.tmp_dir.iterdir()) == []
        assert (settings.spool_dir / "junk" / "broken.dcm").exists()  # unreadable files are kept, logged
    finally:
        daemon.stop()

"""The baseline: a bare pynetdicom storage SCP that writes encoded_dataset() and fsyncs, nothing else.

Run by bench/ingest.py; usage: python bench/bare_scp.py PORT OUTDIR [MAX_PDU]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def handle_store(event: evt.Event, outdir: Path) -> int:
    path = outdir / f"{event.request.AffectedSOPInstanceUID}.dcm"
    with path.open("wb") as fh:
        fh.write(event.encoded_dataset())
        fh.flush()
        os.fsync(fh.fileno())
    return 0x0000


def main() -> None:
    port, outdir = int(sys.argv[1]), Path(sys.argv[2])
    max_pdu = int(sys.argv[3]) if len(sys.argv) > 3 else 131072
    outdir.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="BARESCP")
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = 16
    print("ready", flush=True)
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store, [outdir])])


if __name__ == "__main__":
    main()

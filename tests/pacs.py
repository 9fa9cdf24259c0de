"""A pynetdicom storage SCP standing in for the PACS that receives fracwatch's results."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pydicom import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from tests.conftest import free_port


class FakePacs:
    """Receives C-STOREs on 127.0.0.1, keeps the datasets, answers ``status``."""

    def __init__(
        self, port: int | None = None, ae_title: str = "PACS", status: int = 0x0000, delay: float = 0.0
    ) -> None:
        self.port = port or free_port()
        self.ae_title = ae_title
        self.status = status
        self.delay = delay  # seconds before each C-STORE response (a slow PACS: a store stays in flight)
        self.received: list[Dataset] = []
        self._arrived = threading.Condition()
        self._server = None

    def _on_store(self, event: Event) -> int:
        time.sleep(self.delay)
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        with self._arrived:
            if self.status == 0x0000:
                self.received.append(dataset)
            self._arrived.notify_all()
        return self.status

    def start(self) -> FakePacs:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Dataset]:
        """Block until ``count`` datasets have arrived (or time out); return them."""
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout)
            return list(self.received)

    @property
    def destination(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"


@contextmanager
def running_pacs(**kwargs: object) -> Iterator[FakePacs]:
    pacs = FakePacs(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield pacs
    finally:
        pacs.stop()

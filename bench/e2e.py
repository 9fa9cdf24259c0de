"""End-to-end latency and throughput of ``fracwatch serve``: 2-image DX studies in, SRs out.

    python bench/e2e.py [--studies 30] [--burst 30] [--size 1024] [--stable-after 0.5]

1. Latency: studies are sent one at a time with DCMTK ``storescu``; for each, the time from completion (the
   study's ``completed_at`` in fracwatch's database) to the SR being acknowledged by the receiving SCP.
   Prints p50 and p95.
2. Throughput: a burst of studies sent back to back; studies per minute from the first send to the last SR.
3. The ratio of serving throughput (images/s) to a bare ``model(x)`` loop on the same network and input size
   in this process: how much of the machine the pipeline around the model costs.

Needs the Debian package dcmtk. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import STORESCU, free_port, wait_echo

from fracwatch.config import load_settings
from fracwatch.model.bundle import load_bundle


class Receiver:
    """The PACS: records when each study's SR arrives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.arrivals: dict[str, float] = {}
        self.lock = threading.Condition()
        ae = AE(ae_title="PACS")
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        study = str(event.dataset.StudyInstanceUID)
        with self.lock:
            self.arrivals.setdefault(study, time.time())
            self.lock.notify_all()
        return 0

    def wait(self, studies: set[str], timeout: float) -> None:
        with self.lock:
            self.lock.wait_for(lambda: studies <= set(self.arrivals), timeout=timeout)


def make_study(directory: Path, side: int, seed: int) -> tuple[str, list[Path]]:
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(2):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientName, ds.PatientID = "DX", "Bench^Synthetic", "BENCH"
        ds.PatientOrientation, ds.ImagerPixelSpacing = ["A", "F"], [0.15, 0.15]
        ds.Rows = ds.Columns = side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, size=(side, side), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = directory / f"{seed:04d}_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(study), paths


def send(paths: list[Path], port: int) -> None:
    subprocess.run(
        [STORESCU, "-aec", "FRACWATCH", "-aet", "MODALITY", "127.0.0.1", str(port), *map(str, paths)],
        check=True, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def completed_at(data_dir: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "fracwatch", "studies", "--data-dir", str(data_dir), "--json", "--limit", "100000"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return {
        row["study_instance_uid"]: datetime.fromisoformat(row["completed_at"]).timestamp()
        for row in json.loads(out.stdout)
        if row["completed_at"]
    }


def bare_model_rate(batch: int, seconds: float = 10.0) -> float:
    """Images/s of ``network(x)`` alone, same bundle, batch and input size, inference_mode, channels_last."""
    bundle = load_bundle(load_settings().model_path)
    size = bundle.card.preprocessing.input_size
    network = bundle.network.to(memory_format=torch.channels_last).eval()
    x = torch.rand(batch, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        network(x)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            network(x)
            count += batch
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=30, help="studies for the latency run")
    parser.add_argument("--burst", type=int, default=30, help="studies for the throughput run")
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--stable-after", type=float, default=0.5)
    args = parser.parse_args()
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        data_dir = root / "data"
        env = {**os.environ, "FRACWATCH_COMPLETION_INTERVAL": "0.05", "FRACWATCH_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [sys.executable, "-m", "fracwatch", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(port), "--stable-after", str(args.stable_after),
             "--destination", f"PACS@127.0.0.1:{receiver.port}"],
            env=env,
        )  # fmt: skip
        try:
            wait_echo(port, "FRACWATCH")
            (root / "src").mkdir()
            latency_studies = [make_study(root / "src", args.size, i) for i in range(args.studies)]
            for study, paths in latency_studies:
                send(paths, port)
                receiver.wait({study}, timeout=120)
            burst = [make_study(root / "src", args.size, 10_000 + i) for i in range(args.burst)]
            start = time.time()
            for _, paths in burst:
                send(paths, port)
            receiver.wait({s for s, _ in burst}, timeout=600)
            end = max(receiver.arrivals[s] for s, _ in burst)
            completed = completed_at(data_dir)
        finally:
            server.terminate()
            server.wait(timeout=60)
            receiver.server.shutdown()
    latencies = sorted(receiver.arrivals[s] - completed[s] for s, _ in latency_studies)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    per_minute = len(burst) / (end - start) * 60
    serving_images = 2 * len(burst) / (end - start)
    bare = bare_model_rate(batch=2)
    print(f"latency completion → SR acknowledged ({len(latencies)} studies): p50 {p50:.3f} s, p95 {p95:.3f} s")
    print(f"sustained: {per_minute:.1f} studies/min ({serving_images:.2f} images/s), {args.size}² 16-bit DX")
    print(f"bare model(x) loop, batch 2: {bare:.1f} images/s; serving / bare = {serving_images / bare:.3f}")


if __name__ == "__main__":
    main()

"""End-to-end latency and throughput of ``fracwatch serve``: 2-image DX studies in, SRs out.

    python bench/e2e.py [--studies 30] [--burst 30] [--size 1024 | --rows 3000 --columns 2500] [--jpeg2000]
                        [--stable-after 0.5]

1. Latency: studies are sent one at a time with DCMTK ``storescu``; for each, the time from completion (the
   study's ``completed_at`` in fracwatch's database) to the SR being acknowledged by the receiving SCP — the
   working time; the first study, sent as soon as the daemon answers C-ECHO while its scoring processes may
   still be starting, is printed apart — and, apart from it, the time waiting for stability (last instance
   received → completed: ``stable_after`` plus the completion tick). Prints p50 and p95 of both.
2. Throughput: a burst of studies sent back to back; studies per minute from the first send to the last SR.
3. The ratio of serving throughput (images/s) to a bare ``model(x)`` loop on the same network and input size
   in this process (inputs/s, torch float32, batch 2); and, what says how much of the machine the pipeline
   around the network costs, to the network alone on the runtime the daemon chose, fed the same number of
   inputs per image (the tiles a whole chest is cut into) in batches of one study's inputs.

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
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import STORESCU, free_port, wait_echo

from fracwatch.config import load_settings
from fracwatch.model import runtimes
from fracwatch.model.bundle import Bundle, load_bundle
from fracwatch.model.predictor import select_device
from fracwatch.pipeline.transforms import tile_grid

SPACING_MM = 0.15  # the images' Imager Pixel Spacing: a 3000-pixel side is 450 mm, a whole chest


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


def make_study(
    directory: Path, side: int, seed: int, columns: int | None = None, syntax: UID = ExplicitVRLittleEndian
) -> tuple[str, list[Path]]:
    """Two ``side`` x ``columns`` (default square) 12-bit DX images of one study, stored in ``syntax``
    (JPEG 2000 lossless compresses them)."""
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for index in range(2):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientName, ds.PatientID = "DX", "Bench^Synthetic", "BENCH"
        ds.PatientOrientation, ds.ImagerPixelSpacing = ["A", "F"], [SPACING_MM, SPACING_MM]
        ds.Rows, ds.Columns = side, columns or side
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, size=(ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if syntax != ExplicitVRLittleEndian:
            ds.compress(syntax, generate_instance_uid=False)
        path = directory / f"{seed:04d}_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return str(study), paths


def send(paths: list[Path], port: int) -> None:
    subprocess.run(
        [STORESCU, "-xv", "-R", "-aec", "FRACWATCH", "-aet", "MODALITY", "127.0.0.1", str(port), *map(str, paths)],
        check=True, env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
    )  # fmt: skip


def completed_at(data_dir: Path, field: str = "completed_at") -> dict[str, float]:
    """``field`` (``completed_at``, ``last_received_at``) of every study, from ``fracwatch studies --json``."""
    out = subprocess.run(
        [sys.executable, "-m", "fracwatch", "studies", "--data-dir", str(data_dir), "--json", "--limit", "100000"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return {
        row["study_instance_uid"]: datetime.fromisoformat(row[field]).timestamp()
        for row in json.loads(out.stdout)
        if row[field]
    }


def scoring_batches(http_port: int) -> tuple[float, float]:
    """(scoring batches, study versions in them) so far, from the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    name = "fracwatch_scoring_batch_studies"
    figures = dict(line.split()[:2] for line in text.splitlines() if line.startswith(f"{name}_"))
    return float(figures[f"{name}_count"]), float(figures[f"{name}_sum"])


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def bare_model_rate(bundle: Bundle, batch: int, runtime: str = "torch", seconds: float = 10.0) -> float:
    """Inputs/s of the network alone on ``runtime`` (``torch``: float32 channels_last, inference_mode), same
    bundle, batch and input size."""
    size = bundle.card.preprocessing.input_size
    network = runtimes.build(bundle, runtime, torch.device("cpu"), torch.get_num_threads())
    return runtimes.throughput(network, size, batch=batch, seconds=seconds)


def inputs_per_image(bundle: Bundle, rows: int, columns: int) -> int:
    """How many network inputs the daemon cuts one of the bench's images into (its tiles, or 1)."""
    grid = tile_grid((rows, columns), SPACING_MM, bundle.preprocess_config)
    return 1 if grid is None else len(grid.origins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=30, help="studies for the latency run")
    parser.add_argument("--burst", type=int, default=30, help="studies for the throughput run")
    parser.add_argument("--size", type=int, default=1024, help="image side, pixels (square images)")
    parser.add_argument("--rows", type=int, help="image rows (with --columns: real-size CR/DX, e.g. 3000)")
    parser.add_argument("--columns", type=int, help="image columns (e.g. 2500)")
    parser.add_argument("--jpeg2000", action="store_true", help="send the images JPEG 2000 lossless compressed")
    parser.add_argument("--stable-after", type=float, default=0.5)
    args = parser.parse_args()
    rows, columns = args.rows or args.size, args.columns or args.rows or args.size
    syntax = JPEG2000Lossless if args.jpeg2000 else ExplicitVRLittleEndian
    receiver = Receiver()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port, http_port = free_port(), free_port()
        data_dir = root / "data"
        env = {**os.environ, "FRACWATCH_COMPLETION_INTERVAL": "0.05", "FRACWATCH_LOG_LEVEL": "WARNING"}
        server = subprocess.Popen(
            [sys.executable, "-m", "fracwatch", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
             "--port", str(port), "--http-port", str(http_port), "--stable-after", str(args.stable_after),
             "--destination", f"PACS@127.0.0.1:{receiver.port}"],
            env=env,
        )  # fmt: skip
        try:
            wait_echo(port, "FRACWATCH")
            (root / "src").mkdir()
            latency_studies = [make_study(root / "src", rows, i, columns, syntax) for i in range(args.studies)]
            for study, paths in latency_studies:
                send(paths, port)
                receiver.wait({study}, timeout=120)
            burst = [make_study(root / "src", rows, 10_000 + i, columns, syntax) for i in range(args.burst)]
            start = time.time()
            for _, paths in burst:
                send(paths, port)
            receiver.wait({s for s, _ in burst}, timeout=600)
            end = max(receiver.arrivals[s] for s, _ in burst)
            completed = completed_at(data_dir)
            last_received = completed_at(data_dir, "last_received_at")
            batches, batched = scoring_batches(http_port)
        finally:
            server.terminate()
            server.wait(timeout=60)
            receiver.server.shutdown()
    everything = [receiver.arrivals[s] - completed[s] for s, _ in latency_studies]
    first, latencies = everything[0], everything[1:] or everything  # the first: right after the daemon started
    p50, p95 = percentiles(latencies)
    wait50, wait95 = percentiles([completed[s] - last_received[s] for s, _ in latency_studies])
    per_minute = len(burst) / (end - start) * 60
    serving_images = 2 * len(burst) / (end - start)
    settings = load_settings()
    bundle = load_bundle(settings.model_path)
    bare = bare_model_rate(bundle, batch=2)
    device = select_device(settings.device)
    chosen = runtimes.choose(bundle, settings.runtime, torch.device("cpu"), torch.get_num_threads())
    tiles = inputs_per_image(bundle, rows, columns)
    batch = 2 * tiles  # a study's inputs: one batch per study in the daemon
    network_images = bare_model_rate(bundle, batch, chosen.name) / tiles
    kind = f"{rows} x {columns} 16-bit DX{', JPEG 2000 lossless' if args.jpeg2000 else ''}"
    print(f"working: completion → SR acknowledged ({len(latencies)} studies): p50 {p50:.3f} s, p95 {p95:.3f} s")
    print(f"  the first study, sent as soon as the daemon answered C-ECHO: {first:.2f} s (not in the percentiles)")
    print("  in the order sent: " + " ".join(f"{latency:.2f}" for latency in everything))
    waiting = f"p50 {wait50:.3f} s, p95 {wait95:.3f} s"
    print(f"waiting: last instance → completion (stable_after {args.stable_after} s): {waiting}")
    print(f"sustained: {per_minute:.1f} studies/min ({serving_images:.2f} images/s), {kind}")
    print(f"  scoring batches over both runs: {batches:.0f} for {batched:.0f} study versions "
          f"({batched / max(batches, 1):.2f} a batch; at most {settings.batch_studies(device.type)})")  # fmt: skip
    print(f"bare model(x) loop, batch 2: {bare:.1f} images/s; serving / bare = {serving_images / bare:.3f}")
    print(
        f"the network alone on the runtime the daemon chose ({chosen.name}), batches of one study's {batch} inputs "
        f"({tiles} per image): {network_images:.2f} images/s; serving / network = {serving_images / network_images:.3f}"
    )


if __name__ == "__main__":
    main()

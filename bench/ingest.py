"""Ingest throughput: fracwatch serve vs DCMTK storescp, Orthanc and a bare pynetdicom SCP, in one run.

Every peer receives the same files from DCMTK ``storescu`` over loopback, at its best: TCP_NODELAY=1 for the
DCMTK and Orthanc processes (Debian's builds otherwise stall ~50 ms per object on Nagle's algorithm) and a
128 KiB maximum PDU everywhere. Prints MB/s and images/s per peer and data set, and fracwatch's ratios.

    python bench/ingest.py [--large 200] [--small 500] [--repeat 1] [--senders 1]
                           [--peers storescp,orthanc,bare,fracwatch[,fracwatch-pg,fracwatch-pg-x2]] [--pg URL]

``--senders N`` sends the files over N concurrent associations (N storescu processes, the files dealt among
them). ``fracwatch-pg`` is one receiver on PostgreSQL, ``fracwatch-pg-x2`` two receivers sharing the port
(``--reuse-port``) on one PostgreSQL database and one data directory: what goes past one Python core, seen with
``--senders`` of 2 or more. Each PostgreSQL run gets a database of its own on the server of ``--pg`` (an admin
URL; default the local server's ``postgres`` database), dropped afterwards.

Needs Debian packages dcmtk and orthanc. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

STORESCP = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"
MAX_PDU = 131072
HERE = Path(__file__).resolve().parent
NODELAY_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_files(directory: Path, count: int, side: int) -> list[Path]:
    """``count`` DX images of side x side 16-bit pixels (side 2236 ≈ 10 MB, 512 ≈ 0.5 MB)."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(side, side), dtype=np.uint16).tobytes()
    study = generate_uid()
    series = generate_uid()
    files = []
    for index in range(count):
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study if index < count // 2 else generate_uid()
        ds.SeriesInstanceUID = series
        ds.Modality = "DX"
        ds.PatientName = "Bench^Synthetic"
        ds.PatientID = "BENCH"
        ds.Rows = ds.Columns = side
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = pixels
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = directory / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def wait_echo(port: int, aet: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = subprocess.run(
            [ECHOSCU, "-aec", aet, "127.0.0.1", str(port)], capture_output=True, env=NODELAY_ENV, check=False
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aet} on port {port} never answered C-ECHO")


def listeners(port: int) -> int:
    """Sockets listening on ``port`` on this host (several when receivers share it)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if Path(table).exists():
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                count += fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port
    return count


@contextmanager
def running(cmd: list[str], port: int, aet: str, env: dict[str, str] | None = None, copies: int = 1) -> Iterator[None]:
    procs = []
    try:
        for _ in range(copies):
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        wait_echo(port, aet)
        deadline = time.monotonic() + 60
        while listeners(port) < copies and time.monotonic() < deadline:
            time.sleep(0.2)
        if listeners(port) < copies:
            raise RuntimeError(f"{copies} {aet} receivers never all listened on port {port}")
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
OPTIONS = {"pg": PG_ADMIN}  # main() sets it from --pg


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new PostgreSQL database on ``admin_url``'s server (its SQLAlchemy URL), dropped afterwards."""
    import uuid

    import psycopg

    name = f"fw_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def peer_storescp(work: Path, port: int) -> Callable[[], Iterator[None]]:
    out = work / "storescp"
    out.mkdir()
    cmd = [STORESCP, "-aet", "STORESCP", "--max-pdu", str(MAX_PDU), "-od", str(out), str(port)]
    return lambda: running(cmd, port, "STORESCP", NODELAY_ENV)


def peer_orthanc(work: Path, port: int) -> Callable[[], Iterator[None]]:
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "orthanc" / "storage"),
        "IndexDirectory": str(work / "orthanc" / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": free_port(),
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "StorageCompression": False,
        "MaximumPduLength": MAX_PDU,
        "Plugins": [],
    }
    (work / "orthanc").mkdir()
    path = work / "orthanc" / "config.json"
    path.write_text(json.dumps(config))
    return lambda: running([ORTHANC, str(path)], port, "ORTHANC", NODELAY_ENV)


def peer_bare(work: Path, port: int) -> Callable[[], Iterator[None]]:
    cmd = [sys.executable, str(HERE / "bare_scp.py"), str(port), str(work / "bare"), str(MAX_PDU)]
    return lambda: running(cmd, port, "BARESCP")


def fracwatch_command(work: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fracwatch", "serve", "--data-dir", str(work / "fracwatch"),
        "--host", "127.0.0.1", "--port", str(port), "--max-pdu", str(MAX_PDU), "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def peer_fracwatch(work: Path, port: int) -> Callable[[], Iterator[None]]:
    return lambda: running(fracwatch_command(work, port), port, "FRACWATCH")


def peer_fracwatch_pg(work: Path, port: int, copies: int = 1) -> Callable[[], Iterator[None]]:
    @contextmanager
    def start() -> Iterator[None]:
        with scratch_database(OPTIONS["pg"]) as url:
            # receive-only, no HTTP: every copy the same; the database is migrated before they race to it
            subprocess.run([sys.executable, "-m", "fracwatch", "db", "upgrade", "--db", url], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            extra = ["--db", url, "--workers", "0", "--no-http", *(["--reuse-port"] if copies > 1 else [])]
            with running(fracwatch_command(work, port, *extra), port, "FRACWATCH", copies=copies):
                yield

    return start


PEERS: dict[str, Callable[[Path, int], Callable[[], Any]]] = {
    "storescp": peer_storescp,
    "orthanc": peer_orthanc,
    "bare": peer_bare,
    "fracwatch": peer_fracwatch,
    "fracwatch-pg": peer_fracwatch_pg,
    "fracwatch-pg-x2": lambda work, port: peer_fracwatch_pg(work, port, copies=2),
}
DEFAULT_PEERS = "storescp,orthanc,bare,fracwatch"
AETS = {"storescp": "STORESCP", "orthanc": "ORTHANC", "bare": "BARESCP"}


@dataclass
class Result:
    peer: str
    dataset: str
    images: int
    megabytes: float
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def send(files: list[Path], port: int, aet: str, senders: int = 1) -> float:
    """Seconds to send ``files`` over ``senders`` concurrent associations (the files dealt among them)."""
    command = [STORESCU, "-aec", aet, "-aet", "BENCH", "--max-pdu", str(MAX_PDU), "127.0.0.1", str(port)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen([*command, *map(str, files[index::senders])], env=NODELAY_ENV, stdout=subprocess.DEVNULL)
        for index in range(senders)
    ]
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise RuntimeError(f"storescu failed: exit codes {codes}")
    return time.perf_counter() - start


def measure(peer: str, dataset: str, files: list[Path], root: Path, repeat: int, senders: int = 1) -> Result:
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    best = float("inf")
    for attempt in range(repeat):
        work = root / f"{peer}-{dataset}-{attempt}"
        work.mkdir()
        port = free_port()
        with PEERS[peer](work, port)():
            best = min(best, send(files, port, AETS.get(peer, "FRACWATCH"), senders))
        shutil.rmtree(work, ignore_errors=True)
    return Result(peer, dataset, len(files), megabytes, best)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=200, help="number of 10 MB images")
    parser.add_argument("--small", type=int, default=500, help="number of 0.5 MB images")
    parser.add_argument("--repeat", type=int, default=1, help="runs per peer; the best is kept")
    parser.add_argument("--peers", default=DEFAULT_PEERS, help=f"of {', '.join(PEERS)}")
    parser.add_argument("--senders", type=int, default=1, help="concurrent associations (storescu processes)")
    parser.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL admin URL for the fracwatch-pg peers")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    peers = args.peers.split(",")
    unknown = [peer for peer in peers if peer not in PEERS]
    if unknown:
        sys.exit(f"unknown peers {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    OPTIONS["pg"] = args.pg
    missing = [tool for tool in (STORESCU, STORESCP, ORTHANC) if not Path(tool).exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: apt-get install dcmtk orthanc")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        datasets = {
            "10MB": make_files(root / "large", args.large, 2236),
            "0.5MB": make_files(root / "small", args.small, 512),
        }
        results = {
            (peer, name): measure(peer, name, files, root, args.repeat, args.senders)
            for name, files in datasets.items()
            for peer in peers
        }
    print(f"{args.senders} concurrent association(s)")
    print(f"{'peer':<16} {'data':<6} {'images':>6} {'MB/s':>8} {'images/s':>9}")
    for result in results.values():
        print(
            f"{result.peer:<16} {result.dataset:<6} {result.images:>6} {result.mb_per_s:>8.1f} "
            f"{result.images_per_s:>9.1f}"
        )
    ours_peers = [peer for peer in peers if peer.startswith("fracwatch")]
    others = [peer for peer in peers if not peer.startswith("fracwatch")]
    if ours_peers and others:
        print("\nfracwatch throughput relative to each peer (>1 = fracwatch faster):")
        for ours_peer in ours_peers:
            for name in datasets:
                ours = results[(ours_peer, name)].mb_per_s
                ratios = [f"{peer} {ours / results[(peer, name)].mb_per_s:.2f}x" for peer in others]
                print(f"  {ours_peer:<16} {name:<6} " + ", ".join(ratios))


if __name__ == "__main__":
    main()

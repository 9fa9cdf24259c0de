"""A real Orthanc (Debian package ``orthanc``) started on free loopback ports in a temporary directory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import free_port


class Orthanc:
    """Orthanc with its DICOM and HTTP ports on 127.0.0.1, stopped by PID."""

    def __init__(self, root: Path, modalities: dict[str, list[Any]], lua: list[Path], stable_age: int = 1) -> None:
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        assert Path(binary).exists(), "Orthanc not found: install the Debian package orthanc"
        self.dicom_port = free_port()
        self.http_port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": "ORTHANC",
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "StableAge": stable_age,
            "DicomModalities": modalities,
            "LuaScripts": [str(path) for path in lua],
            "Plugins": [],
        }
        path = root / "orthanc.json"
        path.write_text(json.dumps(config))
        self.log = (root / "orthanc.log").open("w")
        self.process = subprocess.Popen(
            [binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "TCP_NODELAY": "1"}
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)  # polling Orthanc's HTTP port until it answers
        raise RuntimeError("Orthanc did not start")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, payload: Any) -> Any:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def study_id(self, study_instance_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_instance_uid.encode())
        return next((item["ID"] for item in found if item["Type"] == "Study"), None)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()

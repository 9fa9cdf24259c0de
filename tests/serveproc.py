"""Run ``fracwatch serve`` as a real child process and wait on its log instead of sleeping."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path


class ServeProcess:
    """A ``fracwatch serve`` child; ``wait_for`` blocks until a log line contains a text."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            [*(command or [sys.executable, "-m", "fracwatch", "serve"]), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
            start_new_session=True,  # its own process group: kill_group() takes its scoring processes too
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        """Block until ``text`` appears in the output; fail if the process exits or time runs out."""

        def seen() -> bool:
            return any(text in line for line in self.lines) or self.proc.poll() is not None

        with self._changed:
            self._changed.wait_for(seen, timeout=timeout)
            if not any(text in line for line in self.lines):
                raise AssertionError(f"'{text}' never appeared; output:\n{''.join(self.lines)}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)

    def kill_group(self) -> None:
        """SIGKILL the process and every process it started (a host losing power)."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)

    def peak_rss_mb(self) -> float:
        """The process's peak resident memory so far (VmHWM), MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill_group()


def serve_args(data_dir: Path, port: int, *extra: str) -> list[str]:
    """Flags of a test daemon on loopback; its HTTP side gets a free port unless ``extra`` names one."""
    http = [] if "--http-port" in extra or "--no-http" in extra else ["--http-port", str(_free_port())]
    return ["--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(port), *http, *extra]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

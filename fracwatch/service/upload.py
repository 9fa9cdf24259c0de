"""Scoring one uploaded image for the web pages (upload page, ``POST /api/predict``, Grad-CAM thumbnails)."""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fracwatch.model.bundle import Bundle
from fracwatch.model.predictor import Predictor
from fracwatch.model.runtimes import predictor_for
from fracwatch.service.scoring import LoadedImage, cam_pictures, image_category, load_file, score_loaded


@dataclass(frozen=True)
class UploadResult:
    """What the upload page and ``POST /api/predict`` answer."""

    filename: str
    probability: float | None
    category: str
    error: str | None
    model: str
    model_version: str
    cam_png: bytes | None = field(default=None, repr=False)
    reason: str | None = None  # why an out-of-scope image (category "skipped") was not scored

    @property
    def cam_data_uri(self) -> str | None:
        if self.cam_png is None:
            return None
        return "data:image/png;base64," + base64.b64encode(self.cam_png).decode("ascii")


class ImageScorer:
    """Scores one image with Grad-CAM for the web pages: its own copy of the network, one request at a time."""

    def __init__(self, bundle: Bundle, device: str = "cpu", runtime: str = "torch") -> None:
        self.bundle = bundle
        self._device, self._runtime = device, runtime
        self._predictor: Predictor | None = None
        self._lock = threading.Lock()

    def _ready(self) -> Predictor:
        """The predictor, made at the first upload (the daemon's runtime, so the same score): ``auto`` times the
        runtimes, a second of CPU the daemon's start and its first associations should not pay for."""
        if self._predictor is None:
            self._predictor = predictor_for(self.bundle, self._device, runtime=self._runtime)
        return self._predictor

    def score_path(self, path: Path, name: str) -> UploadResult:
        """Probability, category and Grad-CAM picture of a PNG/JPEG/DICOM file."""
        with self._lock:
            predictor = self._ready()
            image: LoadedImage = load_file(path, self.bundle.preprocess_config, rules=self.bundle.scope)
            probability = score_loaded([image], predictor, self.bundle.preprocess_config)[0]
            picture = cam_pictures([image], [probability], predictor, self.bundle)[0]
        png = None
        if picture is not None:
            buffer = io.BytesIO()
            Image.fromarray(picture).save(buffer, format="PNG")
            png = buffer.getvalue()
        card = self.bundle.card
        category = image_category(image, probability, self.bundle)
        return UploadResult(name, probability, category, image.error, card.name, card.version, png, image.skipped)

    def score_bytes(self, data: bytes, name: str) -> UploadResult:
        """As :meth:`score_path` for an upload (kept in a temporary file only while it is scored)."""
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in (".png", ".jpg", ".jpeg") else ".dcm"
        with tempfile.TemporaryDirectory(prefix="fracwatch-upload-") as folder:
            path = Path(folder) / f"upload{suffix}"
            path.write_bytes(data)
            return self.score_path(path, name)

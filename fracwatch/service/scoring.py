"""Scoring: decode the study's radiographs, run the model on batches across studies, persist, write the SR.

Used by the daemon's worker (one batch of complete studies at a time) and by ``fracwatch predict``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy.orm import Session, sessionmaker

from fracwatch import __version__
from fracwatch.dicom.header import PIXEL_TAGS
from fracwatch.dicom.pixels import PixelDataError, decode_dataset, header_spacing
from fracwatch.dicom.spool import Spool
from fracwatch.errors import FracwatchError
from fracwatch.model.bundle import Bundle
from fracwatch.model.gradcam import grad_cam
from fracwatch.model.predictor import Predictor
from fracwatch.pipeline.gate import GateRules, colour_reason, out_of_scope
from fracwatch.pipeline.pictures import MAX_PIXELS, PICTURE_SUFFIXES, PictureError, colourfulness, load_picture
from fracwatch.pipeline.transforms import (
    PreprocessConfig,
    TileGrid,
    content_box,
    decode_target,
    network_inputs,
    stitch_tiles,
    tile_count_corrected,
    tile_grid,
)
from fracwatch.report.overlay import OverlayImage, build_kos, build_overlay, render
from fracwatch.report.sr import AlgorithmIdentity, ScoredImage, build_sr, shallow_copy
from fracwatch.service.lifecycle import Clock, claim, utc_now
from fracwatch.store import instances as lifecycle
from fracwatch.store import outbox, results
from fracwatch.store.instances import HandOver, InstanceRef
from fracwatch.store.results import ImageScore, NewResult, ReportFile

LOGGER = logging.getLogger(__name__)
SKIPPED = "skipped"  # the category of an image (and of a study with nothing else) the gate kept from the model


@dataclass
class LoadedImage:
    """One image ready for the network: its frames' inputs (whole-image inputs, or tiles where the model's
    ``tile_spacing_mm`` asks for them), its header kept for the SR, its first decoded frame kept for overlays
    with the tiles it was cut into (``grid``; None: one whole-image input per frame)."""

    inputs: list[torch.Tensor] = field(default_factory=list)
    header: Dataset | None = None
    error: str | None = None
    skipped: str | None = None  # out of scope (pipeline.gate): why it was not scored; not an error
    display: np.ndarray | None = None
    frames: int = 0
    grid: TileGrid | None = None

    @property
    def display_inputs(self) -> list[torch.Tensor]:
        """The first frame's inputs (what its overlay explains)."""
        return self.inputs[: len(self.grid.origins) if self.grid is not None else 1]


def mean_spacing(spacing: tuple[float, float] | None) -> float | None:
    """One millimetres-per-pixel figure for a (row, column) spacing (they differ only on unusual detectors)."""
    return None if spacing is None else (spacing[0] + spacing[1]) / 2


def _inputs(
    frames: Sequence[np.ndarray], config: PreprocessConfig, spacing_mm: float | None, rules: GateRules | None
) -> LoadedImage:
    """The network inputs of ``frames``, unless the gate finds the first out of scope (then none, and why)."""
    reason = out_of_scope(frames[0], rules) if rules is not None else None
    if reason is not None:
        return LoadedImage(skipped=reason, display=frames[0], frames=len(frames))
    grid = tile_grid(frames[0].shape, spacing_mm, config)  # an instance's frames share one shape
    inputs = [tensor for frame in frames for tensor in network_inputs(frame, config, grid)]
    return LoadedImage(inputs=inputs, display=frames[0], frames=len(frames), grid=grid)


def load_dicom(ds: Dataset, config: PreprocessConfig, rules: GateRules | None = None) -> LoadedImage:
    """Decode and preprocess every frame of a DICOM image, unless the gate (``rules``, the bundle's scope) finds
    it out of scope; errors are captured, never raised."""
    try:
        shape = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        pixels = shape[0] * shape[1] * max(1, int(ds.get("NumberOfFrames", 1) or 1))
        if pixels > MAX_PIXELS:
            return LoadedImage(error=f"{shape[0]} x {shape[1]} pixels over the budget of {MAX_PIXELS} an image")
        target = decode_target(shape, mean_spacing(header_spacing(ds)), config)
        decoded = decode_dataset(ds, target_longest=target)
        loaded = _inputs(list(decoded.frames), config, mean_spacing(decoded.pixel_spacing), rules)
        loaded.header = shallow_copy(ds, without=PIXEL_TAGS)  # reads every element: a bad one fails here
    except (PixelDataError, ValueError, TypeError) as exc:
        return LoadedImage(error=str(exc))
    except Exception as exc:  # a decoder (or an element with an unknown VR) failing unexpectedly: this image only
        return LoadedImage(error=f"cannot decode the image: {exc!r}")
    return loaded


def load_file(
    path: Path, config: PreprocessConfig, spacing_mm: float | None = None, rules: GateRules | None = None
) -> LoadedImage:
    """A DICOM file or a picture (PNG, JPEG, TIFF, BMP), preprocessed with ``config`` (a bundle's) unless the
    gate (``rules``: the bundle's scope; None for none, as in training) finds it out of scope. A picture's
    pixel spacing is ``spacing_mm`` where the caller knows it (a synth manifest, ``predict --pixel-spacing``);
    a DICOM file's comes from its header."""
    if path.suffix.lower() in PICTURE_SUFFIXES:
        try:
            frame = load_picture(path)
            colour = colour_reason(colourfulness(path), rules) if rules is not None else None
            if colour is not None:
                return LoadedImage(skipped=colour, display=frame, frames=1)
            return _inputs([frame], config, spacing_mm, rules)
        except (PictureError, ValueError) as exc:
            return LoadedImage(error=str(exc))
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return LoadedImage(error=f"{path.name} is neither a picture nor a readable DICOM file: {exc}")
    return load_dicom(ds, config, rules)


def image_category(image: LoadedImage, probability: float | None, bundle: Bundle) -> str:
    """An image's category: the bundle's for a score, ``skipped`` out of scope, ``error`` when it failed."""
    if probability is not None:
        return bundle.category(probability)
    return SKIPPED if image.skipped is not None else "error"


def score_loaded(images: Sequence[LoadedImage], predictor: Predictor, config: PreprocessConfig) -> list[float | None]:
    """Probability per image (max over its frames and tiles; with ``config.tile_count_correction`` the odds
    divided by the tile count, ``tile_count_corrected``), None where loading failed; one batched pass."""
    correct = config.tile_count_correction
    inputs = [tensor for image in images for tensor in image.inputs]
    probabilities = predictor.predict(inputs)
    out: list[float | None] = []
    cursor = 0
    for image in images:
        if image.error is not None or not image.inputs:
            out.append(None)
            continue
        count = len(image.inputs)
        strongest = np.max(probabilities[cursor : cursor + count])
        tiles = len(image.grid.origins) if correct and image.grid is not None else 1
        out.append(float(tile_count_corrected(strongest, np.asarray(tiles))))
        cursor += count
    return out


def algorithm_identity(bundle: Bundle) -> AlgorithmIdentity:
    """Who makes the findings: the bundle's model, run by this version of fracwatch."""
    card = bundle.card
    return AlgorithmIdentity(card.name, card.version, card.device_uid, __version__)


def _heatmap(image: LoadedImage, maps: np.ndarray, size: int, predictor: Predictor) -> np.ndarray:
    """The first frame's heat map over its field of view: the tiles' maps stitched on the canvas, each weighted
    by its tile's probability, or the whole-image input's map cropped to the image inside the padding."""
    assert image.display is not None
    if image.grid is not None:
        return stitch_tiles(image.grid, maps, predictor.predict(image.display_inputs))
    top, left, height, width = content_box(image.display.shape, size)
    return maps[0][top : top + height, left : left + width]


def overlay_images(
    images: Sequence[LoadedImage], probabilities: Sequence[float], predictor: Predictor, bundle: Bundle
) -> list[OverlayImage]:
    """Grad-CAM of each scored image's first frame (one batched pass over its inputs), mapped back onto the
    image, paired with the image's probability and category."""
    counts = [len(image.display_inputs) for image in images]
    inputs = torch.stack([tensor for image in images for tensor in image.display_inputs]).to(predictor.device)
    heatmaps = grad_cam(predictor.network, inputs)
    size = bundle.preprocess_config.input_size
    overlays = []
    cursor = 0
    for image, count, probability in zip(images, counts, probabilities, strict=True):
        assert image.display is not None
        overlays.append(
            OverlayImage(
                header=image.header if image.header is not None else Dataset(),
                display=image.display,
                heatmap=_heatmap(image, heatmaps[cursor : cursor + count], size, predictor),
                probability=probability,
                category=bundle.category(probability),
            )
        )
        cursor += count
    return overlays


def cam_pictures(
    images: Sequence[LoadedImage], probabilities: Sequence[float | None], predictor: Predictor, bundle: Bundle
) -> list[np.ndarray | None]:
    """An RGB picture per scored image: the image with its Grad-CAM heat map and verdict (what overlays show)."""
    scored = [(i, p) for i, p in enumerate(probabilities) if p is not None and images[i].display is not None]
    pictures: list[np.ndarray | None] = [None] * len(images)
    if not scored:
        return pictures
    overlays = overlay_images([images[i] for i, _ in scored], [p for _, p in scored], predictor, bundle)
    identity = algorithm_identity(bundle)
    for (index, _), overlay in zip(scored, overlays, strict=True):
        pictures[index] = render(overlay, identity)
    return pictures


def write_cam_pictures(
    names: Sequence[str],
    images: Sequence[LoadedImage],
    probabilities: Sequence[float | None],
    predictor: Predictor,
    bundle: Bundle,
    out_dir: Path,
) -> list[Path | None]:
    """A Grad-CAM PNG per scored image into ``out_dir`` (``fracwatch predict --cam``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path | None] = [None] * len(names)
    for index, picture in enumerate(cam_pictures(images, probabilities, predictor, bundle)):
        if picture is not None:
            target = out_dir / f"{Path(names[index]).stem}.cam.png"
            Image.fromarray(picture).save(target)
            written[index] = target
    return written


def rehearsal_dataset(rows: int = 2400, columns: int = 2000, spacing_mm: float = 0.15) -> Dataset:
    """A made-up 12-bit DX image of a whole chest's size and spacing (noise over a gradient), in a made-up study:
    what a scoring process rehearses on at start (``StudyScorer.rehearse``). Never stored, never sent."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(500, 3000, rows, dtype=np.float32)[:, None]
    pixels = np.clip(gradient + rng.normal(0, 200, (rows, columns)), 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "DX", "Rehearsal^Start", "REHEARSAL"
    ds.PatientOrientation, ds.ImagerPixelSpacing = ["A", "F"], [spacing_mm, spacing_mm]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


AfterSave = Callable[[Session, int, datetime], None]
"""Runs in the transaction that saved a result: (session, study result id, now). Triage uses it."""


@dataclass
class _StudyWork:
    hand_over: HandOver
    instances: list[InstanceRef]
    images: list[LoadedImage]


class StudyScorer:
    """The worker's processor: score complete studies, persist results, write the SR, queue deliveries."""

    def __init__(
        self,
        sessions: sessionmaker[Any],
        bundle: Bundle,
        predictor: Predictor,
        reports: Spool,
        destinations: Sequence[str],
        clock: Clock = utc_now,
        overlays: bool = False,
        after_save: AfterSave | None = None,
    ) -> None:
        self._sessions = sessions
        self._bundle = bundle
        self._predictor = predictor
        self._reports = reports
        self._destinations = list(destinations)
        self._clock = clock
        self._overlays = overlays
        self._after_save = after_save
        self.identity = algorithm_identity(bundle)

    def __call__(self, hand_overs: list[HandOver]) -> None:
        work = []
        for hand_over in claim(self._sessions, hand_overs, self._clock()):
            with self._sessions() as session:
                instances = lifecycle.scorable_instances(session, hand_over.study_instance_uid)
            if not instances:
                with self._sessions() as session, session.begin():
                    lifecycle.mark_skipped(session, hand_over)
                LOGGER.info("study %s has nothing scorable; skipped", hand_over.study_instance_uid)
                continue
            work.append(_StudyWork(hand_over, instances, [self._load(ref) for ref in instances]))
        if not work:
            return
        probabilities = score_loaded(
            [image for item in work for image in item.images], self._predictor, self._bundle.preprocess_config
        )
        cursor = 0
        for item in work:
            count = len(item.images)
            self._finish(item, probabilities[cursor : cursor + count])
            cursor += count

    def rehearse(self) -> None:
        """Score a made-up image and build its SR, keeping nothing: the one-off costs of the first study — the
        decoder's and the network's first calls, highdicom's IOD tables — are paid when the process starts, not
        by the first study it is given. Its effect was not measured apart: in bench/e2e.py the first study arrives
        while the process is still starting and takes about 3 s more with or without it."""
        image = load_dicom(rehearsal_dataset(), self._bundle.preprocess_config, self._bundle.scope)
        if image.error is not None or image.header is None:
            raise FracwatchError(f"the rehearsal image did not load: {image.error}")
        inputs = image.inputs or [torch.zeros(1, *(self._bundle.preprocess_config.input_size,) * 2)]
        probability = float(self._predictor.predict(inputs).max())
        category = self._bundle.category(probability)
        sr = build_sr([ScoredImage(image.header, probability, category)], probability, category, self.identity,
                      self._clock())  # fmt: skip
        sr.save_as(io.BytesIO(), enforce_file_format=True)

    def _load(self, ref: InstanceRef) -> LoadedImage:
        try:
            ds = dcmread(ref.path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return LoadedImage(error=f"cannot read the stored file: {exc}")
        return load_dicom(ds, self._bundle.preprocess_config, self._bundle.scope)

    def _finish(self, item: _StudyWork, probabilities: Sequence[float | None]) -> None:
        bundle = self._bundle
        now = self._clock()
        scores = []
        reported: list[ScoredImage] = []  # the SR's images, in the study's order: scored and not assessed
        for ref, image, probability in zip(item.instances, item.images, probabilities, strict=True):
            if probability is None and image.skipped is not None:
                LOGGER.info("instance %s skipped: %s", ref.sop_instance_uid, image.skipped)
                scores.append(ImageScore(ref.id, None, SKIPPED, image.skipped))
                if image.header is not None:  # the SR (if the study has one) says it was not assessed
                    reported.append(ScoredImage(image.header, None, SKIPPED))
                continue
            if probability is None:
                LOGGER.warning("instance %s not scored: %s", ref.sop_instance_uid, image.error)
                scores.append(ImageScore(ref.id, None, None, image.error or "not scored"))
                continue
            category = bundle.category(probability)
            scores.append(ImageScore(ref.id, probability, category, None, frames=image.frames))
            assert image.header is not None
            reported.append(ScoredImage(image.header, probability, category))
        scored = [s.probability for s in reported if s.probability is not None]
        study_probability = max(scored, default=None)
        category = bundle.category(study_probability) if study_probability is not None else "error"
        if study_probability is None and any(score.category == SKIPPED for score in scores):
            category = SKIPPED  # out of scope, not failed: no SR, no flag
        uid = item.hand_over.study_instance_uid
        report = None
        if study_probability is not None:
            report = self._write_report(uid, reported, study_probability, category, now)
        attachments = self._write_overlays(uid, item, probabilities) if self._overlays and report is not None else []
        points = bundle.card.operating_points
        result = NewResult(
            study_instance_uid=uid,
            study_version=item.hand_over.version,
            model_name=bundle.card.name,
            model_version=bundle.card.version,
            device_uid=bundle.card.device_uid,
            doubt_threshold=points.doubt,
            positive_threshold=points.positive,
            probability=study_probability,
            category=category,
            images=scores,
            scored_at=now,
            report=report,
            destinations=self._destinations if report else [],
            attachments=attachments,
        )
        with self._sessions() as session, session.begin():
            result_id = results.save_result(session, result)
            if self._after_save is not None:
                self._after_save(session, result_id, now)
        LOGGER.info(
            "study %s version %d scored: %s (p=%s, %d images, %d errors)%s",
            uid,
            item.hand_over.version,
            category,
            f"{study_probability:.3f}" if study_probability is not None else "-",
            len(scored),
            len(scores) - len(scored),
            f"; SR {report.sop_instance_uid}" if report else "",
        )

    def _write_overlays(
        self, study_uid: str, item: _StudyWork, probabilities: Sequence[float | None]
    ) -> list[ReportFile]:
        """A heat-map Secondary Capture per scored image, and a KOS of the flagged ones."""
        scored = [(image, p) for image, p in zip(item.images, probabilities, strict=True) if p is not None]
        try:
            overlays = overlay_images(
                [image for image, _ in scored], [p for _, p in scored], self._predictor, self._bundle
            )
        except Exception:
            LOGGER.exception("Grad-CAM failed for study %s; no overlays", study_uid)
            return []
        files: list[ReportFile] = []
        series_uid = str(generate_uid())
        for number, overlay in enumerate(overlays, start=1):
            try:
                sc = build_overlay(overlay, self.identity, series_uid, number)
                files.append(self._write_object(study_uid, sc, "sc"))
            except (FracwatchError, ValueError, TypeError, AttributeError):
                LOGGER.exception("cannot build the overlay of %s", overlay.header.SOPInstanceUID)
        flagged = [o.header for o in overlays if o.category in ("positive", "doubt")]
        if flagged:
            try:
                files.append(self._write_object(study_uid, build_kos(flagged, self.identity), "kos"))
            except (FracwatchError, ValueError, TypeError, AttributeError):
                LOGGER.exception("cannot build the key object selection of study %s", study_uid)
        return files

    def _write_object(self, study_uid: str, dataset: Dataset, kind: str) -> ReportFile:
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        path = self._reports.path_for(study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
        self._reports.write(path, [buffer.getvalue()])
        return ReportFile(
            sop_instance_uid=str(dataset.SOPInstanceUID),
            sop_class_uid=str(dataset.SOPClassUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            path=str(path),
            kind=kind,
        )

    def _write_report(
        self, study_uid: str, images: list[ScoredImage], probability: float, category: str, now: datetime
    ) -> ReportFile | None:
        with self._sessions() as session:
            previous_object = outbox.latest_report(session, study_uid)
            previous_path = previous_object.path if previous_object else None
        previous = None
        if previous_path is not None:
            try:
                previous = dcmread(previous_path)
            except (InvalidDicomError, OSError) as exc:
                LOGGER.error("earlier SR of study %s unreadable (%s); the new SR will not reference it", study_uid, exc)
        try:
            sr = build_sr(images, probability, category, self.identity, now, previous=previous)
            written = self._write_object(study_uid, sr, "sr")
        except (FracwatchError, ValueError, TypeError, AttributeError) as exc:
            LOGGER.exception("cannot build the SR for study %s: %s", study_uid, exc)
            return None
        supersedes = str(previous.SOPInstanceUID) if previous is not None else None
        return dataclasses.replace(written, supersedes=supersedes)

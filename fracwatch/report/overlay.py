"""Viewer-friendly results for viewers that cannot show SR: a Secondary Capture per scored image (the image
with its Grad-CAM heat map and a burned-in verdict) and a Key Object Selection of the flagged images.

The original images are never changed: both are new objects in new series of the same study.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fracwatch.report.sr import MANUFACTURER, AlgorithmIdentity, device_observer, with_type2_defaults

SC_SERIES_NUMBER = 9902
KOS_SERIES_NUMBER = 9903
VERDICTS = {"positive": "fracture suspected", "doubt": "fracture possible", "negative": "no fracture detected"}


@dataclass(frozen=True)
class OverlayImage:
    """A scored image: its header, a display-ready grey frame (bright = dense) and its heat map."""

    header: Dataset
    display: np.ndarray  # (rows, columns) float32, any range
    heatmap: np.ndarray  # (rows', columns') in [0, 1], covering the same field of view
    probability: float
    category: str


def _grey(display: np.ndarray) -> np.ndarray:
    low, high = np.percentile(display, [0.5, 99.5])
    scaled = np.clip((display - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    return (scaled * 255).astype(np.uint8)


def _jet(values: np.ndarray) -> np.ndarray:
    """A blue→red colour ramp for heat maps (N, M) in [0, 1] → (N, M, 3) uint8."""
    v = np.clip(values, 0.0, 1.0)
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8)


def render(image: OverlayImage, identity: AlgorithmIdentity) -> np.ndarray:
    """RGB pixels: the radiograph, the heat map blended where it is strong, a caption bar at the bottom."""
    grey = Image.fromarray(_grey(image.display)).convert("RGB")
    width, height = grey.size
    heat = Image.fromarray((np.clip(image.heatmap, 0, 1) * 255).astype(np.uint8)).resize((width, height))
    heat_values = np.asarray(heat, dtype=np.float32) / 255.0
    alpha = (np.clip((heat_values - 0.3) / 0.7, 0, 1) * 0.5)[..., None]
    base = np.asarray(grey, dtype=np.float32)
    blended = (base * (1 - alpha) + _jet(heat_values).astype(np.float32) * alpha).astype(np.uint8)
    bar = max(24, height // 14)
    canvas = Image.new("RGB", (width, height + bar), (0, 0, 0))
    canvas.paste(Image.fromarray(blended), (0, 0))
    text = (
        f"{identity.manufacturer} {identity.model_version} - {VERDICTS[image.category]} "
        f"(p={image.probability:.2f}) - not for diagnostic use"
    )
    size = max(8, int(bar * 0.6))
    font = ImageFont.load_default(size=size)
    while size > 8 and font.getlength(text) > width - 12:  # fit the caption to the image width
        size -= 1
        font = ImageFont.load_default(size=size)
    draw = ImageDraw.Draw(canvas)
    draw.text((6, height + bar * 0.15), text, fill=(255, 255, 0), font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_overlay(
    image: OverlayImage, identity: AlgorithmIdentity, series_instance_uid: str, number: int
) -> hd.sc.SCImage:
    """A Secondary Capture of ``image`` with its heat map and verdict burned in."""
    pixels = render(image, identity)
    header = with_type2_defaults(image.header)
    laterality = str(header.get("ImageLaterality", header.get("Laterality", ""))).strip() or None
    orientation = header.get("PatientOrientation")
    known_orientation = orientation is not None and len(orientation) == 2
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer=MANUFACTURER,
        laterality=laterality if laterality in ("L", "R") else None,
        # highdicom insists on an orientation; an unknown one is written back as empty (Type 2) below
        patient_orientation=tuple(orientation) if known_orientation else ("A", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if not known_orientation:
        sc.PatientOrientation = ""
    if "Laterality" not in sc and "ImageLaterality" not in sc:
        sc.Laterality = ""  # Type 2C: present, empty when the source does not say
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "fracwatch heat map (AI, not for diagnostic use)"
    sc.ImageComments = f"fracwatch {identity.model_name} {identity.model_version}: {VERDICTS[image.category]}"
    sc.DerivationDescription = "Grad-CAM heat map of the fracture classifier over the source image"
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc


def build_kos(flagged: Sequence[Dataset], identity: AlgorithmIdentity) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection ("Of Interest") listing the images fracwatch flagged."""
    if not flagged:
        raise ValueError("a KOS needs at least one flagged image")
    flagged = [with_type2_defaults(ds) for ds in flagged]
    observer = device_observer(identity)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=list(flagged),
        observer_device_context=observer,
        description="Images fracwatch flagged for possible fracture (AI, not for diagnostic use)",
    )
    return hd.ko.KeyObjectSelectionDocument(
        evidence=list(flagged),
        content=content,
        series_instance_uid=generate_uid(),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
    )

"""The fracture triage result as a TID 1500 Comprehensive 3D SR, in IHE AI Results style.

One measurement group (TID 1501) per scored image: tracking identifier and UID, finding "Fracture of bone"
(SCT 125605004), a qualitative evaluation present / indeterminate (doubt) / absent, the probability as a
numeric measurement with unit "1", the algorithm (TID 4019) and the image as source. A final group carries
the study-level result (max over images). The observer is the device (the model, its Device UID); the same
identity appears in Contributing Equipment. A re-scored study gets a new SR whose Predecessor Documents
Sequence references the SR it supersedes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

FRACTURE_OF_BONE = CodedConcept("125605004", "SCT", "Fracture of bone")
PRESENT = CodedConcept("52101004", "SCT", "Present")
ABSENT = CodedConcept("2667000", "SCT", "Absent")
INDETERMINATE = CodedConcept("82334004", "SCT", "Indeterminate")
NOT_DONE = CodedConcept("385660001", "SCT", "Not done")  # an image the model was kept from: not assessed
PROBABILITY = CodedConcept("122157", "DCM", "Probability")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
RADIOGRAPHIC_PROCEDURE = CodedConcept("363680008", "SCT", "Radiographic imaging procedure")
CATEGORY_VALUES = {"positive": PRESENT, "doubt": INDETERMINATE, "negative": ABSENT, "skipped": NOT_DONE}
SR_SERIES_NUMBER = 9901
MANUFACTURER = "fracwatch"


# Type 2 attributes of the Patient and General Study modules: they must be present (possibly empty) in the
# objects we write, and highdicom copies them from the source. Modalities do omit some of them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def shallow_copy(ds: Dataset, without: frozenset[int] = frozenset()) -> Dataset:
    """A new dataset holding the same elements (``Dataset(ds)`` and ``ds.copy()`` share one element dict)."""
    return Dataset({element.tag: element for element in ds if int(element.tag) not in without})


def with_type2_defaults(ds: Dataset) -> Dataset:
    """A shallow copy of a source header with missing Patient/Study Type 2 attributes present and empty, and
    person names in the current form (``conformant_name``)."""
    copy = shallow_copy(ds)
    for keyword in PATIENT_STUDY_TYPE2:
        if keyword not in copy:
            setattr(copy, keyword, "")
    for keyword in PERSON_NAMES:
        element = copy.data_element(keyword)
        if element is not None and element.VR == "PN" and element.VM == 1 and element.value:
            # a new element: the copy shares the source's, and setting .value would change the source too
            copy[element.tag] = DataElement(element.tag, "PN", conformant_name(str(element.value)))
    return copy


PERSON_NAMES = ("PatientName", "ReferringPhysicianName")


def conformant_name(name: str) -> str:
    """A person name with no component separator (``ward``: the retired, free-text form dciodvfy warns about)
    as a family name (``ward^``): the same name in the current form, nothing dropped."""
    return name if "^" in name or "=" in name or not name.strip() else f"{name}^"


@dataclass(frozen=True)
class AlgorithmIdentity:
    """Who made the finding: the model and the software running it."""

    model_name: str
    model_version: str
    device_uid: str
    software_version: str
    manufacturer: str = MANUFACTURER


@dataclass(frozen=True)
class ScoredImage:
    """A source image (header only is enough) with its probability and category; an image the out-of-scope
    gate kept from the model has no probability and the category ``skipped`` (reported as not assessed)."""

    dataset: Dataset
    probability: float | None
    category: str

    @property
    def assessed(self) -> bool:
        return self.probability is not None


def device_observer(identity: AlgorithmIdentity) -> hd.sr.ObserverContext:
    """The observer context of a device: the model, identified by its Device UID."""
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.model_name,
            manufacturer_name=identity.manufacturer,
            model_name=identity.model_name,
        ),
    )


def _evaluation(category: str) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(name=FRACTURE_OF_BONE, value=CATEGORY_VALUES[category])


def _probability(value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=PROBABILITY, value=round(float(value), 6), unit=NO_UNITS)


def _algorithm(identity: AlgorithmIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=identity.model_name, version=identity.model_version)


def _image_group(
    image: ScoredImage, index: int, identity: AlgorithmIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    what = "fracture assessment" if image.probability is not None else "not assessed (outside the model's scope)"
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"Image {index}: {what}"),
        finding_type=FRACTURE_OF_BONE,
        algorithm_id=_algorithm(identity),
        measurements=[_probability(image.probability)] if image.probability is not None else None,
        qualitative_evaluations=[_evaluation(image.category)],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(image.dataset)],
    )


def _study_group(
    images: Sequence[ScoredImage], probability: float, category: str, identity: AlgorithmIdentity
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="Study: fracture assessment"),
        finding_type=FRACTURE_OF_BONE,
        algorithm_id=_algorithm(identity),
        measurements=[_probability(probability)],
        qualitative_evaluations=[_evaluation(category)],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(i.dataset) for i in images if i.assessed
        ],
    )


def _library_entry(ds: Dataset) -> Dataset | None:
    """A header copy highdicom can describe in the image library, or None if it lacks what TID 1603 needs.

    highdicom's projection-radiography descriptors need Patient Orientation and Imager Pixel Spacing; a CR
    often carries only Pixel Spacing (equivalent when uncalibrated), which is used instead. An image that has
    neither stays referenced as a measurement source and in the evidence, but is left out of the library.
    """
    entry = shallow_copy(ds)  # the source header is not modified
    if "ImagerPixelSpacing" not in entry and "PixelSpacing" in entry:
        entry.ImagerPixelSpacing = entry.PixelSpacing
    orientation = entry.get("PatientOrientation")
    spacing = entry.get("ImagerPixelSpacing")
    if str(entry.get("Modality", "")) in ("CR", "DX") and not (
        orientation is not None and len(orientation) == 2 and _positive_pair(spacing)
    ):
        return None  # a spacing of 0\0 (RG1's "unknown") is not copied into the SR as if it were a measurement
    return entry


def _positive_pair(spacing: Any) -> bool:
    try:
        return spacing is not None and len(spacing) == 2 and all(float(v) > 0 for v in spacing)
    except (TypeError, ValueError):
        return False


def build_sr(
    images: Sequence[ScoredImage],
    study_probability: float,
    study_category: str,
    identity: AlgorithmIdentity,
    content_time: datetime,
    previous: Dataset | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the SR for the ``images`` of one study (patient and study modules copied from them): one group per
    image — scored, or not assessed — and the study's result from the scored ones."""
    if not any(image.assessed for image in images):
        raise ValueError("an SR needs at least one scored image")
    images = [ScoredImage(with_type2_defaults(i.dataset), i.probability, i.category) for i in images]
    observer = device_observer(identity)
    groups = [_image_group(image, index, identity) for index, image in enumerate(images, start=1)]
    groups.append(_study_group(images, study_probability, study_category, identity))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=RADIOGRAPHIC_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=[e for e in (_library_entry(i.dataset) for i in images) if e is not None] or None,
    )
    equipment = hd.ContributingEquipment(
        manufacturer=identity.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=identity.model_name,
        software_versions=[identity.software_version, identity.model_version],
        contribution_datetime=content_time,
        contribution_description="Fracture triage by a convolutional network; not for diagnostic use",
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[image.dataset for image in images],
        content=report,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=identity.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[previous] if previous is not None else None,
        contributing_equipment=[equipment],
        series_description="fracwatch fracture triage (AI, not for diagnostic use)",
        content_date=content_time.date(),
        content_time=content_time.time(),
        software_versions=identity.software_version,
        device_serial_number=None,
    )
    return sr

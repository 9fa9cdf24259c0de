"""Triage message builders: HL7 v2.5 ORU^R01 (python-hl7) and a FHIR R4 Bundle (DiagnosticReport + Observation).

Pure functions of :class:`TriageFacts`; sending lives in ``fracwatch.service.triage``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import hl7

# SNOMED CT 125605004 "Fracture of bone" — the finding the SR reports too.
FRACTURE_CODE = ("125605004", "http://snomed.info/sct", "Fracture of bone")
# DICOM CID 7 "Probability" — the SR's TID 1501 measurement concept.
PROBABILITY_CODE = ("122157", "http://dicom.nema.org/resources/ontology/DCM", "Probability")
HL7_PRIORITY = {"positive": "S", "doubt": "A"}  # OBR-5 / ActPriority: stat, as soon as possible
INTERPRETATION = {"positive": ("POS", "Positive"), "doubt": ("IND", "Indeterminate"), "negative": ("NEG", "Negative")}
CONCLUSION = {
    "positive": "Fracture suspected by fracwatch (AI triage, unverified)",
    "doubt": "Fracture possible; review advised (fracwatch AI triage, unverified)",
    "negative": "No fracture suspected by fracwatch (AI triage, unverified)",
}


@dataclass(frozen=True)
class HL7Header:
    """MSH-3..MSH-6."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str


@dataclass(frozen=True)
class TriageFacts:
    """What a triage message says about one scored study version."""

    control_id: str
    priority: str  # positive, doubt
    category: str
    probability: float
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None  # read from the spooled source when sending; never stored in the database
    issuer_of_patient_id: str | None
    model_name: str
    model_version: str
    device_uid: str
    scored_at: datetime
    patient_name: str | None = None  # DICOM PN (family^given^…), read from the spooled source like patient_id


def _ts(moment: datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S") + "+0000"


def _escape(value: str | None) -> str:
    # python-hl7 escapes with the default encoding characters (|^~\&); the message is built from escaped
    # fields joined by those separators, then parsed back by python-hl7, which checks its structure.
    return hl7.Message("\r").escape(value) if value else ""


UNKNOWN_NAME = "UNKNOWN"  # PID-5 is required: sent when the source study has no Patient's Name


def _person_name(name: str | None) -> str:
    """PID-5 (XPN) from a DICOM PN: its components map one to one (family^given^middle^prefix^suffix); only the
    alphabetic group (before any '=') is sent."""
    alphabetic = (name or "").split("=")[0]
    components = [_escape(part) for part in alphabetic.split("^")[:5]]
    return "^".join(components).rstrip("^") or UNKNOWN_NAME


def build_oru(facts: TriageFacts, header: HL7Header, sent_at: datetime) -> hl7.Message:
    """The ORU^R01 for a flagged study: OBR for the study (priority in OBR-5), OBX with finding and probability."""
    e = _escape
    priority = HL7_PRIORITY.get(facts.priority, "R")
    code, _system, meaning = FRACTURE_CODE
    interpretation = INTERPRETATION.get(facts.category, ("", ""))[0]
    accession = e(facts.accession_number)
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                e(header.sending_application),
                e(header.sending_facility),
                e(header.receiving_application),
                e(header.receiving_facility),
                _ts(sent_at),
                "",
                "ORU^R01^ORU_R01",
                e(facts.control_id),
                "P",
                "2.5",
                "",
                "",
                "AL",
                "NE",
            ]
        ),
        f"PID|1||{e(facts.patient_id)}^^^{e(facts.issuer_of_patient_id)}||{_person_name(facts.patient_name)}",
        f"ORC|RE|{accession}|{accession}||CM",
        "|".join(
            [
                "OBR",
                "1",
                accession,
                accession,
                "FRACTRIAGE^Fracture triage^L",
                priority,
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                e(facts.study_instance_uid),
                "",
                "",
                "",
                _ts(facts.scored_at),
                "",
                "",
                "P",
            ]
        ),
        "|".join(
            [
                "OBX",
                "1",
                "CWE",
                f"{code}^{e(meaning)}^SCT",
                "1",
                f"{code}^{e(meaning)}^SCT" if facts.category != "negative" else "",
                "",
                "",
                interpretation,
                "",
                "",
                "P",
                "",
                "",
                _ts(facts.scored_at),
                "",
                "",
                f"{e(facts.model_name)} {e(facts.model_version)}",
            ]
        ),
        "|".join(
            [
                "OBX",
                "2",
                "NM",
                f"{PROBABILITY_CODE[0]}^{PROBABILITY_CODE[2]}^DCM",
                "1",
                f"{facts.probability:.4f}",
                "1^^UCUM",
                "",
                interpretation,
                "",
                "",
                "P",
            ]
        ),
        f"NTE|1|L|{e(CONCLUSION.get(facts.category, ''))}",
    ]
    return hl7.parse("\r".join(segments))


@dataclass(frozen=True)
class Acknowledgement:
    """MSA-1 and MSA-3 of the answer, and whether it completes, or permanently fails, the message."""

    code: str
    text: str
    accepted: bool
    permanent: bool


def read_ack(answer: hl7.Message, control_id: str) -> Acknowledgement:
    """Interpret an ACK: AA/CA accepted; AR/CR rejected for good; AE/CE (and anything odd) retried."""
    try:
        msa = answer.segment("MSA")
    except KeyError:
        return Acknowledgement("", "the answer has no MSA segment", accepted=False, permanent=False)
    code = str(msa[1]).strip()
    acknowledged_id = str(msa[2]).strip() if len(msa) > 2 else ""
    text = str(msa[3]).strip() if len(msa) > 3 else ""
    if acknowledged_id != control_id:
        return Acknowledgement(code, f"ACK for {acknowledged_id!r}, not {control_id!r}", False, False)
    return Acknowledgement(code, text, accepted=code in ("AA", "CA"), permanent=code in ("AR", "CR"))


def build_fhir_bundle(facts: TriageFacts) -> dict[str, Any]:
    """A FHIR R4 collection Bundle: a preliminary DiagnosticReport and the Observation it summarises."""
    code, system, meaning = FRACTURE_CODE
    observation_id = f"urn:uuid:{_uuid(facts.control_id, 'observation')}"
    interpretation, interpretation_text = INTERPRETATION.get(facts.category, ("", facts.category))
    subject: dict[str, Any] = {}
    if facts.patient_id:
        subject = {"identifier": {"value": facts.patient_id}}
        if facts.issuer_of_patient_id:
            subject["identifier"]["system"] = facts.issuer_of_patient_id
    device = {
        "display": f"{facts.model_name} {facts.model_version}",
        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{facts.device_uid}"},
    }
    identifiers: list[dict[str, Any]] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{facts.study_instance_uid}"}]
    if facts.accession_number:
        identifiers.append(
            {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                "value": facts.accession_number,
            }
        )
    issued = facts.scored_at.isoformat()
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [_coding("http://terminology.hl7.org/CodeSystem/observation-category", "imaging", "Imaging")],
        "code": _coding(system, code, meaning),
        "interpretation": [
            _coding(
                "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                interpretation,
                interpretation_text,
            )
        ],
        "valueQuantity": {
            "value": round(facts.probability, 4),
            "unit": "1",
            "system": "http://unitsofmeasure.org",
            "code": "1",
        },
        "method": {"text": "AI triage (not a diagnosis)"},
        "device": device,
        "issued": issued,
    }
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": {
            "tag": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActPriority",
                    "code": HL7_PRIORITY.get(facts.priority, "R"),
                }
            ]
        },
        "identifier": [{"system": "urn:fracwatch:triage", "value": facts.control_id}],
        "status": "preliminary",
        "category": [_coding("http://terminology.hl7.org/CodeSystem/v2-0074", "RAD", "Radiology")],
        "code": {"text": "Fracture triage (AI)"},
        "issued": issued,
        "performer": [device],
        "result": [{"reference": observation_id}],
        "conclusion": CONCLUSION.get(facts.category, ""),
        "conclusionCode": [_coding(system, code, meaning)] if facts.category != "negative" else [],
        "extension": [{"url": "urn:fracwatch:imaging-study", "valueIdentifier": identifiers[0]}],
        "basedOn": [{"identifier": identifiers[1]}] if len(identifiers) > 1 else [],
    }
    if subject:
        report["subject"] = subject
        observation["subject"] = subject
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": issued,
        "identifier": {"system": "urn:fracwatch:triage", "value": facts.control_id},
        "entry": [
            {"fullUrl": f"urn:uuid:{_uuid(facts.control_id, 'report')}", "resource": report},
            {"fullUrl": observation_id, "resource": observation},
        ],
    }


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def _uuid(control_id: str, kind: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"urn:fracwatch:{control_id}:{kind}"))

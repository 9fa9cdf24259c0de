"""Worklist triage messages: HL7 v2 ORU^R01 and a FHIR R4 DiagnosticReport-shaped webhook body."""

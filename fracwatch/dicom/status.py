"""DICOM status codes fracwatch answers with (PS3.4 Annex B and C.4.2)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk full, database unavailable)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (dataset unparsable, identifying UIDs missing)
PROCESSING_FAILURE = 0x0110

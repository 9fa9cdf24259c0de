"""DICOM status codes fracwatch answers with (PS3.4 Annex B and C.4.2)."""

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (disk full, database unavailable)
CANNOT_UNDERSTAND = 0xC210  # Error: Cannot understand (dataset unparsable, identifying UIDs missing)
PROCESSING_FAILURE = 0x0110

SUCCESS_WITH_WARNING = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


def is_acknowledged(code: int) -> bool:
    """Success, or a warning: the peer has the object (PS3.4 C.4.2.1.4 / Annex B.2.3)."""
    return code == SUCCESS or code in SUCCESS_WITH_WARNING


def is_transient_failure(code: int) -> bool:
    """A failure worth retrying: out of resources (0xA7xx), processing failure, resource limitation."""
    return 0xA700 <= code <= 0xA7FF or code in (PROCESSING_FAILURE, 0x0213)

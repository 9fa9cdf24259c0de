"""DICOM objects fracwatch writes back to the PACS (highdicom): the TID 1500 Structured Report."""

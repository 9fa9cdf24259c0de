"""DICOM on the wire and on disk: the storage SCP, the durable spool, the SCU, header parsing."""

"""The few exception types fracwatch raises; each edge (SCP, CLI, API) translates them."""


class FracwatchError(Exception):
    """Base class of every error fracwatch raises on purpose."""


class ConfigError(FracwatchError):
    """A setting is missing or invalid; the message names the key."""


class SpoolError(FracwatchError):
    """An instance could not be written durably to the spool (disk full, permissions, I/O)."""


class InvalidInstanceError(FracwatchError):
    """A received dataset cannot be understood (missing or malformed identifying attributes)."""


class DatabaseError(FracwatchError):
    """The result database could not be reached or migrated."""


class PeerError(FracwatchError):
    """A remote DICOM peer could not be reached or refused the request."""

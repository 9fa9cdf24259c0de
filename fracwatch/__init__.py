"""fracwatch: triage X-ray studies for bone fractures beside a PACS."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fracwatch")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]

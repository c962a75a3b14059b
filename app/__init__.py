"""The edge of secateurs: settings, job schemas, errors and the command line. Never imports torch."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("secateurs")
except _metadata.PackageNotFoundError:  # running from a checkout that was not installed
    __version__ = "0+unknown"

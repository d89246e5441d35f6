"""The package version, in its own module so that every layer can import it."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("torchkeep")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

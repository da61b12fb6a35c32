"""foundation: one data layer and one trainer for scientific foundation models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("foundation")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"

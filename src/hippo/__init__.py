"""HippoVolume: hippocampal volume from MRI (curate, train, deploy)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hippo")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

"""PCBM Studio's library: post-hoc concept bottleneck models on any open_clip backbone."""

from importlib.metadata import PackageNotFoundError, version

from ml.errors import ConfigError, DataError, NotFittedError, PCBMError, ShapeError

try:
    __version__ = version("pcbm-studio")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["ConfigError", "DataError", "NotFittedError", "PCBMError", "ShapeError", "__version__"]

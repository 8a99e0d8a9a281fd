"""PCBM Studio's library: post-hoc concept bottleneck models on any open_clip backbone."""

from ml.errors import ConfigError, DataError, NotFittedError, PCBMError, ShapeError

__all__ = ["ConfigError", "DataError", "NotFittedError", "PCBMError", "ShapeError"]

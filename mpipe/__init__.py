"""mpipe: config-driven, multiprocess batch pipelines."""

from mpipe.messages import Task

__version__ = "0.1.0"

__all__ = ["Task", "__version__"]

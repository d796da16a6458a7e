"""mpipe: config-driven, multiprocess batch pipelines."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpipe.messages import Task

__version__ = "0.1.0"

__all__ = ["Task", "__version__"]


def __getattr__(name: str) -> Any:
    # `mpipe.Task` is imported on first use: `mpipe run` imports this package
    # before it starts its forkserver, and mpipe.messages is not needed that early.
    if name == "Task":
        from mpipe.messages import Task

        return Task
    raise AttributeError(f"module 'mpipe' has no attribute {name!r}")

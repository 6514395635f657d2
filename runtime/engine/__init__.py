"""Continuous-batching engine (see :mod:`runtime.engine.engine`). Importing this package imports torch."""

from runtime.engine.engine import Engine, EngineConfig
from runtime.engine.sequence import (
    EngineError,
    QueueFullError,
    RequestTooLargeError,
    Sequence,
    ShuttingDownError,
    TokenEvent,
)

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "QueueFullError",
    "RequestTooLargeError",
    "Sequence",
    "ShuttingDownError",
    "TokenEvent",
]

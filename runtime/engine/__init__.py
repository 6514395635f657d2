"""Continuous-batching engine (see :mod:`runtime.engine.engine`). Importing this package imports torch.

``engine`` runs the loop; ``scheduler`` decides what each step runs, ``model_runner`` runs it on the model,
``postprocess`` applies the stop rules to the sampled tokens, ``stats`` keeps the metrics; ``sequence`` is
the per-request state, ``config`` the limits.
"""

from runtime.engine.config import EngineConfig
from runtime.engine.engine import Engine
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

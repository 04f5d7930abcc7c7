"""freeal: label a text data set with no human in the loop (FreeAL, EMNLP 2023)."""

from freeal.annotate import label_texts
from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.errors import FreeALError
from freeal.tasks import Task, load_task

__all__ = [
    "FreeAL",
    "FreeALError",
    "LLMConfig",
    "LoopConfig",
    "SLMConfig",
    "Task",
    "label_texts",
    "load_task",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``freeal.FreeAL`` is imported on first use: it pulls in torch, which ``annotate`` never needs."""
    if name == "FreeAL":
        from freeal.loop import FreeAL

        return FreeAL
    raise AttributeError(f"module 'freeal' has no attribute {name!r}")

"""freeal: label a text data set with no human in the loop (FreeAL, EMNLP 2023)."""

from freeal.annotate import label_texts
from freeal.config import LLMConfig, SLMConfig
from freeal.errors import FreeALError
from freeal.tasks import Task, load_task

__all__ = ["FreeALError", "LLMConfig", "SLMConfig", "Task", "label_texts", "load_task"]
__version__ = "0.1.0"

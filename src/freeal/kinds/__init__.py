"""Kinds of task as sibling plugins found in a registry.

Each kind (:class:`~freeal.kinds.base.TaskKind`) tells the one loop in :mod:`freeal.loop` what its
steps mean: :mod:`~freeal.kinds.classification` and :mod:`~freeal.kinds.ner` are the two there
are. A new kind subclasses ``TaskKind`` and is added with :func:`register`.
"""

from __future__ import annotations

from freeal.errors import FreeALError
from freeal.kinds.base import Answers, SLMFit, TaskKind
from freeal.kinds.classification import Classification
from freeal.kinds.ner import NER
from freeal.tasks import Task

KINDS: dict[str, type[TaskKind]] = {}


def register(kind: type[TaskKind]) -> type[TaskKind]:
    """Make a task kind known to the loop under its ``name`` (usable as a class decorator)."""
    KINDS[kind.name] = kind
    return kind


for _kind in (Classification, NER):
    register(_kind)


def kind_of(task: Task) -> TaskKind:
    """The kind that runs ``task`` through the loop."""
    if task.kind not in KINDS:
        raise FreeALError(f"task {task.name!r}: no loop for kind {task.kind!r} (known: {', '.join(KINDS)})")
    return KINDS[task.kind](task)


__all__ = ["KINDS", "Answers", "SLMFit", "TaskKind", "kind_of", "register"]

"""Zero-shot labeling: every text labeled by the LLM, each answer a label of the set with a confidence.

The heavy lifting (the model, the cache) is in :mod:`freeal.llm`; this module builds the prompts,
applies contextual calibration, and turns answers into rows. Because every answer is cached the
moment it arrives, calling :func:`annotate` again after a kill resumes where the last run stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import pandas as pd
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from freeal.data import Items
from freeal.llm.base import LabelScores, log_softmax, softmax
from freeal.llm.cache import CachedAnnotator
from freeal.llm.prompts import CONTENT_FREE_INPUTS, classification_prompt
from freeal.tasks import Task

T = TypeVar("T")


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} items/s" if speed else "- items/s")


def progress_bar(iterable: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with a rich progress bar showing count, rate and time left."""
    if not enabled:
        yield from iterable
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task_id)


def content_free_offsets(task: Task, annotator: CachedAnnotator) -> list[float]:
    """Mean normalized log-score of each label on inputs that carry no content (contextual calibration).

    Subtracting it removes the model's prior preference for some labels (Zhao et al., 2021).
    """
    prompts = [classification_prompt(task, text) for text in CONTENT_FREE_INPUTS]
    rows = [
        log_softmax(ans.scores) for _, ans in annotator.score_many(prompts, task.label_names) if ans.scores
    ]
    if not rows:
        return [0.0] * len(task.labels)
    return np.mean(np.asarray(rows), axis=0).tolist()


def decide(
    answer: LabelScores, labels: Sequence[str], offsets: Sequence[float] | None
) -> tuple[str | None, float | None, list[float] | None]:
    """(label, confidence, probabilities) from one answer, calibrated by ``offsets`` when given."""
    if answer.scores is None:
        return answer.label, None, None
    adjusted = log_softmax(answer.scores)
    if offsets is not None:
        adjusted = [a - o for a, o in zip(adjusted, offsets, strict=True)]
    probs = softmax(adjusted)
    best = int(np.argmax(probs))
    return labels[best], probs[best], probs


def annotate(
    task: Task,
    items: Items,
    annotator: CachedAnnotator,
    *,
    calibrate: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Label every item zero-shot.

    Returns one row per item: ``id, text, label, confidence`` (``label`` None = abstained), plus
    ``probs`` (per label, after calibration) and ``log_scores`` (the raw answer, so other
    calibration choices can be evaluated without calling the model again).
    """
    labels = task.label_names
    offsets = content_free_offsets(task, annotator) if calibrate else None
    prompts = [classification_prompt(task, text) for text in items.texts]
    answers: list[LabelScores | None] = [None] * len(prompts)
    for i, answer in progress_bar(annotator.score_many(prompts, labels), len(prompts), "labeling", progress):
        answers[i] = answer
    rows = []
    for item_id, text, answer in zip(items.ids, items.texts, answers, strict=True):
        assert answer is not None  # every prompt is answered or score_many raised
        label, confidence, probs = decide(answer, labels, offsets)
        rows.append(
            {
                "id": item_id,
                "text": text,
                "label": label,
                "confidence": confidence,
                "probs": dict(zip(labels, probs, strict=True)) if probs else None,
                "log_scores": answer.scores,
            }
        )
    return pd.DataFrame(rows)

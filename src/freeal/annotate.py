"""Zero-shot labeling: every text labeled by the LLM, each answer a label of the set with a confidence.

The heavy lifting (the model, the cache) is in :mod:`freeal.llm`; this module builds the prompts,
applies contextual calibration, and turns answers into rows. Because every answer is cached the
moment it arrives, calling :func:`annotate` again after a kill resumes where the last run stopped.
"""

from __future__ import annotations

from collections import Counter
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

from freeal.config import Calibration, LLMConfig
from freeal.data import Items, read_items
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


def label_entropy(predicted: Sequence[str | None]) -> float:
    """Entropy (bits) of the distribution of predicted labels."""
    counts = np.asarray(list(Counter(p for p in predicted if p is not None).values()), dtype=np.float64)
    if counts.size == 0:
        return 0.0
    share = counts / counts.sum()
    return float(-(share * np.log2(share)).sum())


def choose_calibration(
    answers: Sequence[LabelScores], labels: Sequence[str], offsets: Sequence[float]
) -> bool:
    """The gold-free ``auto`` rule: calibrate when that spreads the predicted labels more evenly.

    A model's prior preference for some labels shows up as predictions piled onto them; calibration
    removes it, but on a small model it can over-correct and pile predictions onto the other side.
    Keeping whichever labeling has the higher label entropy picked the more accurate one in 5 of 6
    measured cases and cost 0.2 points in the sixth (BENCHMARKS.md). It assumes classes that are
    not extremely imbalanced: with a known strong skew, set calibration on or off yourself.
    """
    plain = [decide(a, labels, None)[0] for a in answers]
    calibrated = [decide(a, labels, offsets)[0] for a in answers]
    return label_entropy(calibrated) > label_entropy(plain)


def annotate(
    task: Task,
    items: Items,
    annotator: CachedAnnotator,
    *,
    calibrate: Calibration = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Label every item zero-shot.

    Returns one row per item: ``id, text, label, confidence`` (``label`` None = abstained), plus
    ``probs`` (per label, after calibration) and ``log_scores`` (the raw answer, so other
    calibration choices can be evaluated without calling the model again). ``frame.attrs``
    records whether calibration was applied (``calibrated``), which matters for ``auto``.
    """
    labels = task.label_names
    offsets = content_free_offsets(task, annotator) if calibrate != "off" else None
    prompts = [classification_prompt(task, text) for text in items.texts]
    answers: list[LabelScores] = [None] * len(prompts)  # type: ignore[list-item]
    for i, answer in progress_bar(annotator.score_many(prompts, labels), len(prompts), "labeling", progress):
        answers[i] = answer
    if calibrate == "auto" and offsets is not None and not choose_calibration(answers, labels, offsets):
        offsets = None
    rows = []
    for item_id, text, answer in zip(items.ids, items.texts, answers, strict=True):
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
    frame = pd.DataFrame(rows)
    frame.attrs["calibrated"] = offsets is not None
    return frame


def label_texts(
    task: Task, texts: Sequence[str] | Items, llm: LLMConfig | None = None, *, progress: bool = True
) -> pd.DataFrame:
    """Zero-shot labels for a list of texts (or :class:`~freeal.data.Items`) from Python.

    ``llm`` defaults to the embedded Qwen2.5-Coder-1.5B with ``auto`` calibration; the answers are
    cached on disk, so calling again with the same texts costs no model call.
    """
    from freeal.llm import make_annotator

    cfg = llm or LLMConfig()
    items = (
        texts if isinstance(texts, Items) else read_items(pd.DataFrame({"text": list(texts)}), label_col=None)
    )
    return annotate(task, items, make_annotator(cfg), calibrate=cfg.calibrate, progress=progress)

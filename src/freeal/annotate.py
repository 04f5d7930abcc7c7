"""Zero-shot labeling: every text labeled by the LLM, each answer a label of the set with a confidence.

The heavy lifting (the model, the cache) is in :mod:`freeal.llm`; this module builds the prompts,
applies contextual calibration, and turns answers into rows. Because every answer is cached the
moment it arrives, calling :func:`annotate` again after a kill resumes where the last run stopped.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from freeal.config import Calibration, LLMConfig
from freeal.data import Items, read_items
from freeal.llm.base import LabelScores, LazyPrompts, Message, log_softmax, softmax
from freeal.llm.cache import CachedAnnotator
from freeal.llm.prompts import CONTENT_FREE_INPUTS, classification_prompt
from freeal.progress import progress_bar
from freeal.tasks import Task


def content_free_offsets(task: Task, annotator: CachedAnnotator) -> list[float]:
    """Mean normalized log-score of each label on inputs that carry no content (contextual calibration).

    Subtracting it removes the model's prior preference for some labels (Zhao et al., 2021). This is
    :func:`label_groups`' per-group calibration for one group without demonstrations or texts.
    """
    frame = label_groups(task, [], annotator, [((), ())], calibrate="on", progress=False)
    return frame.attrs["group_offsets"][0] or [0.0] * len(task.labels)


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
    answers: Sequence[LabelScores], labels: Sequence[str], offsets: Sequence[Sequence[float] | None]
) -> bool:
    """The gold-free ``auto`` rule: calibrate when that spreads the predicted labels more evenly.

    A model's prior preference for some labels shows up as predictions piled onto them; calibration
    removes it, but on a small model it can over-correct and pile predictions onto the other side.
    Keeping whichever labeling has the higher label entropy picked the more accurate one in 5 of 6
    measured cases and cost 0.2 points in the sixth (BENCHMARKS.md). It assumes classes that are
    not extremely imbalanced: with a known strong skew, set calibration on or off yourself.
    ``offsets`` holds each answer's own offsets (they differ between groups of demonstrations).
    """
    plain = [decide(a, labels, None)[0] for a in answers]
    calibrated = [decide(a, labels, o)[0] for a, o in zip(answers, offsets, strict=True)]
    return label_entropy(calibrated) > label_entropy(plain)


Group = tuple[Sequence[int] | np.ndarray, Sequence[tuple[str, str]]]


def label_groups(
    task: Task,
    texts: Sequence[str],
    annotator: CachedAnnotator,
    groups: Sequence[Group],
    *,
    calibrate: Calibration = "auto",
    progress: bool = True,
    description: str = "labeling",
) -> pd.DataFrame:
    """Label ``texts`` group by group; every item of a group sees the group's demonstrations.

    A group is ``(item positions, demonstrations)``, the demonstrations ``(text, label)`` pairs in
    prompt order. Prompts go to the model group after group, so that a backend reusing its KV cache
    (llama.cpp) evaluates the instructions and a group's demonstrations once and then only each
    item's own tokens. Contextual calibration is per group: the content-free inputs are asked with
    the group's demonstrations (which costs only their few tokens), since demonstrations shift the
    model's label prior. Items in no group are returned unlabeled (``label`` None, ``asked`` False).

    Returns one row per text: ``label, confidence, probs, log_scores, asked``; ``frame.attrs``
    records whether calibration was applied (``calibrated``) and each group's content-free offsets
    (``group_offsets``, computed unless ``calibrate="off"``), so other choices can be evaluated later.
    """
    labels = task.label_names
    calib = calibrate != "off"
    # what each prompt asks: (group, item position, or -1 - k for content-free input k)
    neutral = np.arange(-1, -1 - len(CONTENT_FREE_INPUTS), -1) if calib else np.zeros(0, dtype=np.int64)
    asks = [np.concatenate([neutral, np.asarray(members, dtype=np.int64)]) for members, _ in groups]
    item_of = np.concatenate(asks) if asks else np.zeros(0, dtype=np.int64)
    group_of = np.repeat(np.arange(len(groups)), [len(a) for a in asks])

    def prompt(j: int) -> list[Message]:
        i = int(item_of[j])
        text = texts[i] if i >= 0 else CONTENT_FREE_INPUTS[-1 - i]
        return classification_prompt(task, text, groups[group_of[j]][1])

    answers: dict[int, LabelScores] = {}
    free: list[list[list[float]]] = [[] for _ in groups]
    stream = annotator.score_many(LazyPrompts(len(item_of), prompt), labels)
    for j, answer in progress_bar(stream, len(item_of), description, progress):
        g, i = int(group_of[j]), int(item_of[j])
        if i >= 0:
            answers[i] = answer
        elif answer.scores:
            free[g].append(log_softmax(answer.scores))
    per_group = [np.mean(np.asarray(f), axis=0).tolist() if f else None for f in free]
    offsets = {int(i): per_group[g] for g, (members, _) in enumerate(groups) if per_group[g] for i in members}
    if calibrate == "auto" and offsets:
        asked = sorted(answers)
        if not choose_calibration([answers[i] for i in asked], labels, [offsets.get(i) for i in asked]):
            offsets = {}
    rows: list[dict[str, Any]] = []
    for i in range(len(texts)):
        found = answers.get(i)
        if found is None:
            rows.append(
                {"label": None, "confidence": None, "probs": None, "log_scores": None, "asked": False}
            )
            continue
        label, confidence, probs = decide(found, labels, offsets.get(i))
        rows.append(
            {
                "label": label,
                "confidence": confidence,
                "probs": dict(zip(labels, probs, strict=True)) if probs else None,
                "log_scores": found.scores,
                "asked": True,
            }
        )
    frame = pd.DataFrame(rows, columns=["label", "confidence", "probs", "log_scores", "asked"])
    frame.attrs["calibrated"] = bool(offsets)
    frame.attrs["group_offsets"] = per_group
    return frame


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
    task.require_classification("zero-shot annotation")
    everything = [(range(len(items)), ())]
    frame = label_groups(task, items.texts, annotator, everything, calibrate=calibrate, progress=progress)
    frame.insert(0, "text", items.texts)
    frame.insert(0, "id", items.ids)
    return frame.drop(columns="asked")


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

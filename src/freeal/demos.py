"""Demonstrations: written by the LLM, or the clean set's k-medoids pool; and who sees which.

Initial round: the LLM writes demonstrations for each label itself (:func:`generate_demonstrations`).
Refinery rounds use FreeAL's feedback step. Per class, the items on which the SLM agrees with the
given label and whose loss is smallest form the clean set; k-medoids (FasterPAM, from the
``kmedoids`` package) on their embeddings picks a small pool that covers each class; each item to
label then gets its nearest pool members by cosine similarity, balanced across classes, so the LLM
sees every label in context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from difflib import SequenceMatcher

import kmedoids
import numpy as np
from sklearn.cluster import KMeans

from freeal.config import Calibration
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator
from freeal.llm.prompts import generation_prompt
from freeal.tasks import Task

_NUMBERED = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*(.+?)\s*$")


@dataclass
class Demonstration:
    """A pool member as plain data: item index, its label and its (clean-set) loss."""

    index: int
    label: str
    loss: float

    def to_json(self) -> dict:
        return asdict(self)


def select_clean(
    given: Sequence[str | None], predicted: Sequence[str], losses: np.ndarray, fraction: float = 0.2
) -> np.ndarray:
    """Indices of the clean set: per class, the lowest-loss ``fraction`` of the class's items, drawn
    only from items where the SLM's prediction agrees with the given label."""
    if not 0 < fraction <= 1:
        raise FreeALError(f"clean fraction must be in (0, 1], got {fraction}")
    chosen: list[int] = []
    given_arr = np.asarray([g if g is not None else "" for g in given], dtype=object)
    agree = np.asarray([g is not None and g == p for g, p in zip(given, predicted, strict=True)])
    for label in sorted({g for g in given if g is not None}):
        in_class = given_arr == label
        quota = math.ceil(fraction * int(in_class.sum()))
        candidates = np.flatnonzero(in_class & agree)
        chosen.extend(candidates[np.argsort(losses[candidates], kind="stable")][:quota].tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)


def medoid_pool(
    embeddings: np.ndarray,
    labels: Sequence[str],
    candidates: np.ndarray,
    losses: np.ndarray,
    size: int = 100,
    seed: int = 0,
) -> list[Demonstration]:
    """A class-balanced pool of about ``size`` items: per class, the k-medoids of its candidates
    (cosine distance on unit embeddings); a class with fewer candidates than its share keeps them all."""
    classes = sorted({labels[i] for i in candidates})
    if not classes:
        return []
    per_class = max(1, size // len(classes))
    pool: list[Demonstration] = []
    for label in classes:
        members = np.asarray([i for i in candidates if labels[i] == label])
        if len(members) <= per_class:
            picked = members
        else:
            vectors = embeddings[members]
            distance = np.clip(1.0 - vectors @ vectors.T, 0.0, None).astype(np.float64)
            np.fill_diagonal(distance, 0.0)
            result = kmedoids.fasterpam(distance, per_class, random_state=seed, n_cpu=1)
            picked = members[np.sort(np.asarray(result.medoids))]
        pool.extend(Demonstration(int(i), label, float(losses[i])) for i in picked)
    return pool


def nearest_demonstrations(
    query: np.ndarray,
    pool_embeddings: np.ndarray,
    pool_labels: Sequence[str],
    k: int = 10,
    balanced: bool = True,
) -> list[list[int]]:
    """For each query vector, positions in the pool of its ``k`` nearest members by cosine.

    ``balanced`` takes ``k // n_classes`` per class, at least one (the remainder going to the most
    similar of the rest), so every label appears. Each list is ordered least similar first, most
    similar last: the nearest demonstration then sits right before the item in the prompt.
    """
    if len(pool_labels) == 0:
        return [[] for _ in range(len(query))]
    sims = query @ pool_embeddings.T
    labels = np.asarray(pool_labels, dtype=object)
    out: list[list[int]] = []
    for row in sims:
        ranked = np.argsort(-row, kind="stable")
        if balanced:
            classes = sorted(set(pool_labels))
            share = max(1, k // len(classes))
            picked = [i for c in classes for i in ranked[labels[ranked] == c][:share]]
            taken = set(picked)
            picked += [i for i in ranked if i not in taken][: max(0, k - len(picked))]
        else:
            picked = list(ranked[:k])
        out.append(sorted(picked, key=lambda i: row[i]))
    return out


@dataclass
class Feedback:
    """What the SLM hands back to the LLM: the clean set and the demonstration pool drawn from it."""

    clean: np.ndarray
    pool: list[Demonstration]

    @property
    def pool_indices(self) -> np.ndarray:
        return np.asarray([d.index for d in self.pool], dtype=np.int64)


def feedback(
    given: Sequence[str | None],
    predicted: Sequence[str],
    losses: np.ndarray,
    embeddings: np.ndarray,
    *,
    fraction: float = 0.2,
    pool_size: int = 100,
    seed: int = 0,
) -> Feedback:
    """The clean set (:func:`select_clean`) and its k-medoids pool (:func:`medoid_pool`)."""
    clean = select_clean(given, predicted, losses, fraction)
    labels = [g if g is not None else "" for g in given]
    return Feedback(clean, medoid_pool(embeddings, labels, clean, losses, pool_size, seed))


# -- the initial round: demonstrations written by the LLM ------------------------------------------


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _is_copy(norm: str, shown: Sequence[str]) -> bool:
    """Empty, or (nearly) one of the shown style examples: contained in it, containing it, or
    a character-level similarity of 0.8 or more (a copy with a word changed)."""
    return not norm or any(
        s and (norm in s or s in norm or SequenceMatcher(None, norm, s).ratio() >= 0.8) for s in shown
    )


def _per_label(demos: Sequence[tuple[str, str]], task: Task) -> dict[str, int]:
    return {label: sum(1 for _, lab in demos if lab == label) for label in task.label_names}


def parse_generated(answer: str) -> list[str]:
    """The texts of a numbered (or bulleted) list, unquoted; lines that are not list entries dropped."""
    texts = []
    for line in answer.splitlines():
        match = _NUMBERED.match(line)
        if match:
            text = match.group(1).strip().strip('"').strip("“”").strip()
            if text:
                texts.append(text)
    return texts


@dataclass
class GenerationReport:
    """What demonstration writing cost and how much of it was kept."""

    calls: int
    written: int
    kept: int
    dropped_copies: int
    dropped_duplicates: int
    per_label: dict[str, int]


def generate_demonstrations(
    task: Task,
    annotator: CachedAnnotator,
    style_texts: Sequence[str],
    *,
    per_label: int = 16,
    per_call: int = 4,
    style_examples: int = 3,
    temperature: float = 0.8,
    max_calls_per_label: int | None = None,
    seed: int = 0,
) -> tuple[list[tuple[str, str]], GenerationReport]:
    """``(text, label)`` demonstrations written by the LLM, ``per_label`` for each label if it can.

    Each call shows ``style_examples`` unlabeled texts (drawn from ``style_texts`` under ``seed``) and
    asks for ``per_call`` new texts of one label. Texts are kept when non-empty, not a (near) copy of
    a style example (:func:`_is_copy`), and not a duplicate of a text already kept
    (compared lower-cased without punctuation, across labels too: a text written for two labels is
    ambiguous and kept only for the first). Calls continue until the quota is met or
    ``max_calls_per_label`` (default: twice the calls needed) is spent; a label that ends empty is
    an error, since the prompts would never show it.
    """
    if not style_texts:
        raise FreeALError("demonstration writing needs at least one unlabeled text to show as style")
    rng = np.random.default_rng(seed)
    needed = math.ceil(per_label / per_call)
    budget = max_calls_per_label or 2 * needed
    kept: list[tuple[str, str]] = []
    seen: set[str] = set()
    written = copies = duplicates = calls = 0
    for label in task.label_names:
        mine = 0
        for attempt in range(budget):
            if mine >= per_label:
                break
            pick = rng.choice(len(style_texts), size=min(style_examples, len(style_texts)), replace=False)
            shown = [style_texts[int(i)] for i in pick]
            prompt = generation_prompt(task, label, shown, per_call)
            _, answer = next(
                iter(
                    annotator.generate_many(
                        [prompt], max_tokens=80 * per_call, temperature=temperature, seed=seed + attempt
                    )
                )
            )
            calls += 1
            shown_norm = [_normal(t) for t in shown]
            for text in parse_generated(answer.text):
                written += 1
                norm = _normal(text)
                if _is_copy(norm, shown_norm):
                    copies += 1
                elif norm in seen:
                    duplicates += 1
                elif mine < per_label:
                    seen.add(norm)
                    kept.append((text, label))
                    mine += 1
        if mine == 0:
            raise FreeALError(
                f"the LLM wrote no usable demonstration for label {label!r} in {budget} calls; "
                "describe the label more concretely in the task, or use a stronger model"
            )
    return kept, GenerationReport(calls, written, len(kept), copies, duplicates, _per_label(kept, task))


def verify_demonstrations(
    task: Task,
    annotator: CachedAnnotator,
    demos: Sequence[tuple[str, str]],
    *,
    calibrate: Calibration = "auto",
    min_per_label: int = 3,
) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Keep the written demonstrations that the LLM itself, asked zero-shot, labels as intended.

    A small model often writes a text that fits another label (on TREC, "How many miles is it from
    New York to Los Angeles?" written as a *description* question); shown as a demonstration, it
    teaches the wrong label. Each text is labeled zero-shot by label scoring (one cheap call) and
    kept when the answer is the label it was written for. A label left with fewer than
    ``min_per_label`` keeps its texts the model scores highest for it, so every label still appears.
    Returns the kept demonstrations (in their original order) and how many were kept per label.
    """
    from freeal.annotate import label_groups

    texts = [t for t, _ in demos]
    frame = label_groups(
        task, texts, annotator, [(range(len(texts)), ())], calibrate=calibrate, progress=False
    )
    keep = {i for i, (_, label) in enumerate(demos) if frame["label"][i] == label}
    for label in task.label_names:
        mine = [i for i, (_, lab) in enumerate(demos) if lab == label]
        agreed = [i for i in mine if i in keep]
        if len(agreed) < min_per_label:
            ranked = sorted(mine, key=lambda i: -(frame["probs"][i] or {}).get(label, 0.0))
            keep.update([i for i in ranked if i not in keep][: min_per_label - len(agreed)])
    kept = [d for i, d in enumerate(demos) if i in keep]
    return kept, _per_label(kept, task)


# -- who sees which demonstrations ----------------------------------------------------------------


def demonstration_groups(
    item_vectors: np.ndarray,
    demo_vectors: np.ndarray,
    demo_labels: Sequence[str],
    *,
    k: int = 10,
    balanced: bool = True,
    group_size: int | None = 32,
    seed: int = 0,
) -> list[tuple[np.ndarray, list[int]]]:
    """``(item positions, demonstration positions)`` groups: every item with its nearest demonstrations.

    ``group_size=None`` gives FreeAL's literal setting, each item its own ``k`` nearest (one group
    per item). Otherwise items are clustered (k-means on their unit embeddings, about
    ``group_size`` items per cluster) and a cluster shares the ``k`` demonstrations nearest to its
    centroid: neighbours of similar texts are mostly the same, and a shared set is a shared prompt
    prefix, so an embedded model evaluates the demonstrations once per group instead of once per
    item (BENCHMARKS.md measures both). Demonstrations are ordered most similar last.
    """
    n = len(item_vectors)
    if n == 0:
        return []
    if k == 0 or len(demo_labels) == 0:
        return [(np.arange(n), [])]
    if group_size is None or n <= group_size:
        clusters = np.arange(n) if group_size is None else np.zeros(n, dtype=np.int64)
    else:
        n_clusters = math.ceil(n / group_size)
        clusters = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(item_vectors)
    groups = []
    for c in np.unique(clusters):
        members = np.flatnonzero(clusters == c)
        centre = item_vectors[members].mean(axis=0, keepdims=True)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        nearest = nearest_demonstrations(centre, demo_vectors, demo_labels, k=k, balanced=balanced)[0]
        groups.append((members, [int(j) for j in nearest]))
    return groups

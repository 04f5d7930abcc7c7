"""Demonstrations: the clean set, a diverse per-class pool picked by k-medoids, and kNN retrieval.

This is FreeAL's feedback step. Per class, the items on which the SLM agrees with the given label and
whose loss is smallest form the clean set; k-medoids (FasterPAM, from the ``kmedoids`` package) on
their embeddings picks a small pool that covers each class; each item to label then gets its nearest
pool members by cosine similarity, balanced across classes, so the LLM sees every label in context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import kmedoids
import numpy as np

from freeal.errors import FreeALError


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

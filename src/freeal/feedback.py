"""FreeAL's feedback step: what the SLM hands back to the LLM.

Per class (an answer's *signature*: its label, or for NER the set of types a sentence holds), the
items on which the SLM reproduces the LLM's answer and whose loss averaged over epochs is smallest
form the **clean set**; k-medoids (FasterPAM, from the ``kmedoids`` package) on their embeddings
picks a small, diverse, class-balanced **pool** of demonstrations from it; every other item the SLM
flags as noisy (or the LLM left unanswered) is the **noisy set** that refinery asks again.
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
    """A pool member as plain data: item position, its signature and its (clean-set) loss."""

    index: int
    label: str
    loss: float

    def to_json(self) -> dict:
        return asdict(self)


def select_clean(
    signatures: Sequence[str | None],
    agree: Sequence[bool] | np.ndarray,
    losses: np.ndarray,
    fraction: float = 0.2,
) -> np.ndarray:
    """Positions of the clean set: per signature, the lowest-loss ``fraction`` of its items, drawn
    only from items where the SLM agrees with the LLM's answer (``None``: no answer, never clean)."""
    if not 0 < fraction <= 1:
        raise FreeALError(f"clean fraction must be in (0, 1], got {fraction}")
    chosen: list[int] = []
    given = np.asarray([g if g is not None else "" for g in signatures], dtype=object)
    agreed = np.asarray(agree, dtype=bool) & np.asarray([g is not None for g in signatures])
    losses = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=np.inf)
    for label in sorted({g for g in signatures if g is not None}):
        in_class = given == label
        quota = math.ceil(fraction * int(in_class.sum()))
        candidates = np.flatnonzero(in_class & agreed)
        chosen.extend(candidates[np.argsort(losses[candidates], kind="stable")][:quota].tolist())
    return np.asarray(sorted(chosen), dtype=np.int64)


# A class with at most this many candidates gets FasterPAM on its full distance matrix, as freeal
# has always done: pools are identical to earlier runs up to this size (with the default clean
# fraction of 0.2, any class of a 10,000-text set). The matrix costs n² memory and FasterPAM about
# n^2.4 time (2.2 GB and 38 s at 20,000 candidates), so a larger class is sampled (CLARA).
MEDOID_SAMPLE = 2_000
# CLARA draws this many samples per class and keeps the medoids closest to the whole class.
MEDOID_DRAWS = 3
# Rows per block when measuring a class's distance to its medoids: memory stays block × k.
_BLOCK = 16_384


def _fasterpam(vectors: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Positions (ascending) in ``vectors`` of their ``k`` medoids: FasterPAM on cosine distances."""
    distance = np.clip(1.0 - vectors @ vectors.T, 0.0, None).astype(np.float64)
    np.fill_diagonal(distance, 0.0)
    result = kmedoids.fasterpam(distance, k, random_state=seed, n_cpu=1)
    return np.sort(np.asarray(result.medoids))


def _total_distance(vectors: np.ndarray, medoids: np.ndarray) -> float:
    """Sum over ``vectors`` of the cosine distance to the nearest of ``medoids`` (unit vectors)."""
    total = 0.0
    for start in range(0, len(vectors), _BLOCK):
        nearest = (vectors[start : start + _BLOCK] @ medoids.T).max(axis=1)
        total += float(np.clip(1.0 - nearest, 0.0, None).sum())
    return total


def _medoids(vectors: np.ndarray, k: int, seed: int, stream: int) -> np.ndarray:
    """Positions (ascending) in ``vectors`` of ``k`` medoids, in time and memory linear in their number.

    Up to MEDOID_SAMPLE vectors (or CLARA's 40 + 2k, if more), exact FasterPAM. Beyond, CLARA
    (Kaufman & Rousseeuw): FasterPAM on MEDOID_DRAWS random samples of that size, keeping the
    medoids with the smallest total distance from all the vectors (n × k, no n² matrix). The
    samples come from ``seed`` and ``stream`` (the class's position), so a pool is reproducible.
    """
    sample_size = max(MEDOID_SAMPLE, 40 + 2 * k)
    if len(vectors) <= sample_size:
        return _fasterpam(vectors, k, seed)
    rng = np.random.default_rng([seed, stream])
    draws: list[tuple[float, np.ndarray]] = []
    for _ in range(MEDOID_DRAWS):
        sample = np.sort(rng.choice(len(vectors), size=sample_size, replace=False))
        medoids = sample[_fasterpam(vectors[sample], k, seed)]
        draws.append((_total_distance(vectors, vectors[medoids]), medoids))
    return min(draws, key=lambda draw: draw[0])[1]


def medoid_pool(
    embeddings: np.ndarray,
    labels: Sequence[str],
    candidates: np.ndarray,
    losses: np.ndarray,
    size: int = 100,
    seed: int = 0,
) -> list[Demonstration]:
    """A class-balanced pool of about ``size`` items: per class, the k-medoids of its candidates
    (cosine distance on unit embeddings, :func:`_medoids`); a class with fewer candidates than its
    share keeps them all. Classes are split with one stable sort, so cost stays linear in their
    number of candidates however many classes there are."""
    candidates = np.asarray(candidates, dtype=np.intp)
    given = np.asarray(labels, dtype=object)[candidates]
    classes, inverse, counts = np.unique(given, return_inverse=True, return_counts=True)
    if not len(classes):
        return []
    per_class = max(1, size // len(classes))
    by_class = np.split(candidates[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])
    pool: list[Demonstration] = []
    for stream, (label, members) in enumerate(zip(classes, by_class, strict=True)):
        if len(members) <= per_class:
            picked = members
        else:
            picked = members[_medoids(embeddings[members], per_class, seed, stream)]
        pool.extend(Demonstration(int(i), str(label), float(losses[i])) for i in picked)
    return pool


@dataclass
class Feedback:
    """The clean set, its demonstration pool, and the noisy set to ask again (positions)."""

    clean: np.ndarray
    pool: list[Demonstration]
    noisy: np.ndarray

    @property
    def pool_indices(self) -> np.ndarray:
        return np.asarray([d.index for d in self.pool], dtype=np.int64)


def feedback(
    signatures: Sequence[str | None],
    agree: Sequence[bool] | np.ndarray,
    noisy: Sequence[bool] | np.ndarray,
    losses: np.ndarray,
    embeddings: np.ndarray,
    *,
    fraction: float = 0.2,
    pool_size: int = 100,
    seed: int = 0,
) -> Feedback:
    """The clean set (:func:`select_clean`), its k-medoids pool (:func:`medoid_pool`), and the items
    to ask again: those flagged ``noisy`` (or without an answer), except the pool's own members,
    whose answers stand since they are shown as demonstrations."""
    clean = select_clean(signatures, agree, losses, fraction)
    labels = [g if g is not None else "" for g in signatures]
    pool = medoid_pool(embeddings, labels, clean, np.nan_to_num(losses, nan=np.inf), pool_size, seed)
    ask = np.asarray(noisy, dtype=bool) | np.asarray([g is None for g in signatures])
    ask[[d.index for d in pool]] = False
    return Feedback(clean, pool, np.flatnonzero(ask))

"""Demonstration grouping and the k-medoids pool at scale (issue 14), on random vectors.

Up to the thresholds (EXACT_GROUPING_MAX, MEDOID_SAMPLE) both must give exactly what the quadratic
code gave before, kept here as ``old_*`` references, so that earlier runs and benchmark numbers
stay valid; above them, the grouping must still partition the items into groups of about
``group_size`` and the CLARA pool must be nearly as central as the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import kmedoids
import numpy as np
import pytest
from sklearn.cluster import KMeans

from freeal import demos as demos_module
from freeal import feedback as feedback_module
from freeal.demos import demonstration_groups, nearest_demonstrations
from freeal.feedback import Demonstration, medoid_pool

Groups = list[tuple[np.ndarray, list[int]]]


def old_demonstration_groups(
    item_vectors: np.ndarray,
    demo_vectors: np.ndarray,
    demo_labels: Sequence[str],
    *,
    k: int = 10,
    balanced: bool = True,
    group_size: int | None = 32,
    seed: int = 0,
) -> Groups:
    """``demonstration_groups`` as it was before issue 14 (flat k-means, one pass per cluster)."""
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


def old_medoid_pool(
    embeddings: np.ndarray,
    labels: Sequence[str],
    candidates: np.ndarray,
    losses: np.ndarray,
    size: int = 100,
    seed: int = 0,
) -> list[Demonstration]:
    """``medoid_pool`` as it was before issue 14 (full distance matrix per class)."""
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


def unit_vectors(n: int, seed: int, dim: int = 384) -> np.ndarray:
    """``n`` random unit vectors (float32, like sentence embeddings)."""
    vectors = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def clustered_vectors(n: int, centres: int, seed: int, dim: int = 384) -> np.ndarray:
    """``n`` unit vectors around ``centres`` random directions (cosine about 0.7 to their centre), so
    that medoids have structure to find."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)) / math.sqrt(dim)
    vectors = middle[rng.integers(centres, size=n)] + 0.05 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def total_distance(vectors: np.ndarray, pool: list[Demonstration]) -> float:
    """Sum over ``vectors`` of the cosine distance to the nearest pool member."""
    medoids = vectors[[d.index for d in pool]]
    return float(np.clip(1.0 - (vectors @ medoids.T).max(axis=1), 0.0, None).sum())


def assert_same_groups(new: Groups, old: Groups) -> None:
    assert len(new) == len(old)
    for (members, picked), (old_members, old_picked) in zip(new, old, strict=True):
        assert members.dtype == old_members.dtype
        assert np.array_equal(members, old_members)
        assert picked == old_picked


@pytest.mark.parametrize(
    ("n", "group_size", "k", "balanced", "seed"),
    [(3000, 32, 10, True, 0), (700, 16, 6, False, 3), (300, None, 4, True, 1), (20, 32, 10, True, 0)],
)
def test_grouping_below_threshold_is_identical_to_the_old_code(
    n: int, group_size: int | None, k: int, balanced: bool, seed: int
) -> None:
    items = unit_vectors(n, seed)
    demo_vectors = unit_vectors(100, seed + 100)
    demo_labels = ["pos", "neg", "neutral", "mixed"] * 25
    args = (items, demo_vectors, demo_labels)
    kwargs = {"k": k, "balanced": balanced, "group_size": group_size, "seed": seed}
    assert_same_groups(demonstration_groups(*args, **kwargs), old_demonstration_groups(*args, **kwargs))


def test_grouping_above_threshold_partitions_items_into_groups_of_about_group_size() -> None:
    n, group_size = 25_000, 32
    assert n > demos_module.EXACT_GROUPING_MAX
    items = clustered_vectors(n, 400, seed=5)
    demo_vectors = unit_vectors(100, 6)
    demo_labels = ["a", "b"] * 50
    groups = demonstration_groups(items, demo_vectors, demo_labels, k=10, group_size=group_size, seed=0)
    members = [m for m, _ in groups]
    assert np.array_equal(np.sort(np.concatenate(members)), np.arange(n))  # each item exactly once
    assert all(np.all(np.diff(m) > 0) for m in members)
    assert 0.7 * group_size <= n / len(groups) <= 1.05 * group_size
    assert all(len(picked) == 10 for _, picked in groups)
    assert all({demo_labels[j] for j in picked} == {"a", "b"} for _, picked in groups)
    again = demonstration_groups(items, demo_vectors, demo_labels, k=10, group_size=group_size, seed=0)
    assert_same_groups(again, groups)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_grouping_above_threshold_of_identical_vectors_still_splits() -> None:
    """k-means cannot split identical vectors; they are grouped by position instead of recursing."""
    n = demos_module.EXACT_GROUPING_MAX + 5_000
    items = np.tile(unit_vectors(1, 0), (n, 1))
    groups = demonstration_groups(items, unit_vectors(10, 1), ["a", "b"] * 5, k=2, group_size=32)
    assert [len(m) for m, _ in groups] == [32] * (n // 32) + [n % 32]
    assert np.array_equal(np.concatenate([m for m, _ in groups]), np.arange(n))


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_grouping_above_threshold_splits_a_block_of_copies_into_groups_of_group_size() -> None:
    """Many copies of one text among other texts: the part they fall in is grouped by position too."""
    n, copies = demos_module.EXACT_GROUPING_MAX + 4_000, 1_000
    items = np.vstack([clustered_vectors(n - copies, 400, seed=5), np.tile(unit_vectors(1, 0), (copies, 1))])
    groups = demonstration_groups(items, unit_vectors(10, 1), ["a", "b"] * 5, k=2, group_size=32)
    assert max(int((m >= n - copies).sum()) for m, _ in groups) <= 32
    assert np.array_equal(np.sort(np.concatenate([m for m, _ in groups])), np.arange(n))


@pytest.mark.parametrize("seed", [0, 7])
def test_medoid_pool_below_threshold_is_identical_to_the_old_code(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 6000
    vectors = clustered_vectors(n, 80, seed)
    labels = rng.choice(["a", "b", "c"], size=n, p=[0.4, 0.35, 0.25]).tolist()
    candidates = np.sort(rng.choice(n, size=3000, replace=False))
    for i in candidates[[5, 2000]]:
        labels[i] = "tiny"  # a class with fewer candidates than its share keeps them all
    losses = rng.random(n)
    new = medoid_pool(vectors, labels, candidates, losses, size=90, seed=seed)
    old = old_medoid_pool(vectors, labels, candidates, losses, size=90, seed=seed)
    assert new == old
    assert medoid_pool(vectors, labels, candidates[:0], losses) == old_medoid_pool(
        vectors, labels, candidates[:0], losses
    )


def test_medoid_pool_above_threshold_is_balanced_from_candidates_and_deterministic() -> None:
    rng = np.random.default_rng(11)
    n = 9000
    vectors = clustered_vectors(n, 200, 11)
    labels = ["big"] * 7000 + ["small"] * 2000
    candidates = np.concatenate([np.arange(0, 6000), np.arange(7000, 7500)])  # 6,000 and 500
    assert feedback_module.MEDOID_SAMPLE < 6000
    losses = rng.random(n)
    pool = medoid_pool(vectors, labels, candidates, losses, size=100, seed=3)
    assert {c: sum(d.label == c for d in pool) for c in ("big", "small")} == {"big": 50, "small": 50}
    assert {d.index for d in pool} <= set(candidates.tolist())
    assert len({d.index for d in pool}) == 100
    assert all(labels[d.index] == d.label and d.loss == losses[d.index] for d in pool)
    big = [d.index for d in pool if d.label == "big"]
    assert big == sorted(big)
    assert pool == medoid_pool(vectors, labels, candidates, losses, size=100, seed=3)
    assert pool != medoid_pool(vectors, labels, candidates, losses, size=100, seed=4)


def test_clara_pool_is_nearly_as_central_as_the_exact_one(monkeypatch: pytest.MonkeyPatch) -> None:
    vectors = clustered_vectors(3000, 150, 21)
    labels = ["c"] * 3000
    candidates = np.arange(3000)
    losses = np.zeros(3000)
    exact = medoid_pool(vectors, labels, candidates, losses, size=100, seed=0)
    monkeypatch.setattr(feedback_module, "MEDOID_SAMPLE", 1000)
    sampled = medoid_pool(vectors, labels, candidates, losses, size=100, seed=0)
    assert len(sampled) == 100 and sampled != exact
    assert total_distance(vectors, sampled) <= 1.10 * total_distance(vectors, exact)

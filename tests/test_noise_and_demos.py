"""The functional core of the SLM's feedback: GMM split, clean-set selection, k-medoids, kNN."""

from __future__ import annotations

import numpy as np
import pytest

from freeal.demos import nearest_demonstrations
from freeal.errors import FreeALError
from freeal.feedback import medoid_pool, select_clean
from freeal.slm.augment import make_views, token_noise
from freeal.slm.noise import clean_probability, split_clean


def test_gmm_gives_low_losses_high_clean_probability():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.1, 0.05, 300), rng.normal(2.0, 0.3, 60)]).clip(0)
    prob = clean_probability(losses)
    assert prob[:300].mean() > 0.95
    assert prob[300:].mean() < 0.05


def test_constant_losses_are_all_clean():
    assert clean_probability(np.full(10, 0.3)).tolist() == [1.0] * 10


def test_per_class_split_keeps_each_class():
    """A model biased towards class 0 gives class 1 larger losses; a global split would call most
    of class 1 noisy, the per-class split keeps its low-loss items clean."""
    rng = np.random.default_rng(1)
    cls0 = np.concatenate([rng.normal(0.05, 0.02, 200), rng.normal(1.5, 0.2, 20)])
    cls1 = np.concatenate([rng.normal(0.9, 0.05, 200), rng.normal(2.5, 0.2, 20)])
    losses, groups = np.concatenate([cls0, cls1]).clip(0), np.repeat([0, 1], 220)
    global_mask, _ = split_clean(losses)
    per_class_mask, _ = split_clean(losses, groups=groups)
    assert global_mask[220:420].mean() < 0.2
    assert per_class_mask[220:420].mean() > 0.9
    assert per_class_mask[420:].mean() < 0.1


def test_select_clean_takes_lowest_loss_agreeing_items_per_class():
    given = ["a", "a", "a", "a", "b", "b", "b", None]
    predicted = ["a", "a", "b", "a", "b", "b", "b", "a"]
    losses = np.array([0.3, 0.1, 0.0, 0.2, 0.5, 0.4, 0.6, 0.0])
    agree = [g == p for g, p in zip(given, predicted, strict=True)]
    chosen = select_clean(given, agree, losses, fraction=0.5)
    # class a: quota 2 of 4, item 2 disagrees, lowest agreeing are 1 and 3; class b: quota 2 of 3
    assert chosen.tolist() == [1, 3, 4, 5]
    with pytest.raises(FreeALError, match="clean fraction"):
        select_clean(given, agree, losses, fraction=0)


def test_medoid_pool_is_balanced_deterministic_and_made_of_candidates():
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(120, 16))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = ["x"] * 60 + ["y"] * 50 + ["z"] * 10
    candidates = np.arange(0, 120, 1)[np.arange(120) % 4 != 3]  # 90 candidates
    losses = rng.random(120)
    pool = medoid_pool(vectors, labels, candidates, losses, size=12, seed=0)
    again = medoid_pool(vectors, labels, candidates, losses, size=12, seed=0)
    assert [d.index for d in pool] == [d.index for d in again]
    assert {d.index for d in pool} <= set(candidates.tolist())
    counts = {c: sum(d.label == c for d in pool) for c in "xyz"}
    assert counts == {"x": 4, "y": 4, "z": 4}
    assert all(labels[d.index] == d.label for d in pool)


def test_medoids_minimize_within_cluster_distance():
    """Two tight groups of one class: the two medoids fall one in each group."""
    rng = np.random.default_rng(3)
    a = np.array([1.0, 0.0]) + rng.normal(0, 0.01, (20, 2))
    b = np.array([0.0, 1.0]) + rng.normal(0, 0.01, (20, 2))
    vectors = np.vstack([a, b])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pool = medoid_pool(vectors, ["c"] * 40, np.arange(40), np.zeros(40), size=2)
    assert sorted(d.index < 20 for d in pool) == [False, True]


def test_nearest_demonstrations_balanced_and_most_similar_last():
    pool = np.eye(4)
    labels = ["p", "p", "n", "n"]
    query = np.array([[0.9, 0.5, 0.1, 0.0]])
    (picked,) = nearest_demonstrations(query, pool, labels, k=2)
    assert sorted(labels[i] for i in picked) == ["n", "p"]
    assert picked[-1] == 0  # the most similar comes last, right before the item
    (unbalanced,) = nearest_demonstrations(query, pool, labels, k=2, balanced=False)
    assert sorted(unbalanced) == [0, 1]


def test_token_noise_views_are_reproducible_and_different():
    texts = ["a fine and moving film about grief and love", "dull"]
    views = make_views(texts, seed=4)
    assert views == make_views(texts, seed=4)
    assert views[0] != texts[0] and set(views[0].split()) <= set(texts[0].split())
    assert views[1] == "dull"
    assert token_noise("one two", np.random.default_rng(0), p_delete=1.0)

"""The structure vote: labels from the texts' clusters where the LLM's answers carry little signal."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest

from freeal.config import LoopConfig, SLMConfig
from freeal.data import read_jsonl
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.loop import FreeAL
from freeal.structure import MAX_AGREEMENT, MIN_CHECK_KAPPA, anchors, structure_vote
from freeal.tasks import Task


def blobs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in four tight groups, two per class, and each vector's class."""
    centres = rng.normal(size=(4, 16))
    group = rng.integers(0, 4, size=n)
    vectors = centres[group] + 0.1 * rng.normal(size=(n, 16))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), group % 2


def biased(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An annotator that favours label 0 everywhere and leans only a little to the true label:
    its answers are label 0 for every text, so they are right on half of them."""
    lean = 0.8 - 0.15 * truth + 0.05 * rng.normal(size=len(truth))
    return np.stack([lean, 1 - lean], axis=1)


def test_the_vote_recovers_the_classes_a_biased_annotator_hides():
    rng = np.random.default_rng(0)
    vectors, truth = blobs(400, rng)
    proba = biased(truth, rng)
    assert (proba.argmax(1) == truth).mean() == pytest.approx(0.5, abs=0.06)
    found = structure_vote(vectors, proba, np.ones(400, bool))
    assert (found.labels == truth).mean() > 0.95
    assert found.passed and found.check_kappa > 0.8 and found.agreement < MAX_AGREEMENT
    assert ((found.confidence >= 0.5) & (found.confidence <= 1)).all()


def test_the_check_declines_clusters_that_do_not_follow_the_answers():
    """The same annotator over vectors that carry nothing of the classes: the vote is a guess, and
    its check says so without gold."""
    rng = np.random.default_rng(1)
    _, truth = blobs(400, rng)
    vectors, _ = blobs(400, rng)  # groups drawn independently of the classes
    found = structure_vote(vectors, biased(truth, rng), np.ones(400, bool))
    assert not found.passed and found.check_kappa < MIN_CHECK_KAPPA
    assert (found.labels == truth).mean() < 0.65


def test_the_vote_stays_out_where_it_agrees_with_the_answers():
    """An annotator right on 90% of the texts, over clusters that follow the classes: the vote passes
    its check, but it agrees with the answers, which already say per text what it says per cluster."""
    rng = np.random.default_rng(3)
    vectors, truth = blobs(400, rng)
    said = np.where(rng.random(400) < 0.9, truth, 1 - truth)
    proba = np.where(said[:, None] == [0, 1], 0.8, 0.2)
    found = structure_vote(vectors, proba, np.ones(400, bool))
    assert found.check_kappa >= MIN_CHECK_KAPPA and found.agreement >= MAX_AGREEMENT
    assert not found.passed


def test_unanswered_texts_take_their_cluster_label_without_counting():
    rng = np.random.default_rng(2)
    vectors, truth = blobs(400, rng)
    proba = biased(truth, rng)
    answered = rng.random(400) > 0.2
    proba[~answered] = [1.0, 0.0]  # whatever an unanswered row holds must not sway its cluster
    found = structure_vote(vectors, proba, answered)
    assert (found.labels[~answered] == truth[~answered]).mean() > 0.95


def test_anchors_are_each_labels_most_distinctive_answers_not_the_most_confident():
    # every answer is label 0 with high confidence; the texts leaning most to label 1 are 3 and 5
    proba = np.array([[0.95, 0.05], [0.96, 0.04], [0.9, 0.1], [0.6, 0.4], [0.97, 0.03], [0.65, 0.35]] * 5)
    members, claimed = anchors(proba)
    assert set(members[claimed == 1]) <= {3, 5, 9, 11, 15, 17, 21, 23, 27, 29}
    assert set(claimed) == {0, 1}


TOPICS = Task(
    name="topics",
    description="Is the text about cooking or about sport?",
    labels={"cooking": "food and recipes", "sport": "games and athletes"},
)
FOODS = ["onions", "garlic", "carrots", "rice", "flour", "tomatoes", "beans", "noodles", "peppers", "lentils"]
TEAMS = ["Leeds", "Porto", "Lyon", "Ajax", "Celtic", "Benfica", "Napoli", "Sevilla", "Everton", "Roma"]
COOKING = [f"Stir the chopped {f} into the pan with {n} spoons of butter." for f in FOODS for n in (2, 3)]
SPORT = [f"The {t} striker scored a late goal in minute {m} of the match." for t in TEAMS for m in (70, 85)]


def leaning_annotator(text: str, labels: list[str]) -> str | dict[str, float]:
    """Says `cooking` for nearly everything, a little less surely for sport texts; sure of `sport`
    for four of them. Content-free calibration inputs get no lean."""
    if text in SPORT:
        sure = SPORT.index(text) % 5 == 0
        return {"sport": 0.0, "cooking": -1.0} if sure else {"sport": -1.5, "cooking": 0.0}
    if text in COOKING:
        return {"cooking": 0.0, "sport": -3.0}
    return {"cooking": 0.0, "sport": 0.0}


@pytest.mark.parametrize("weak_labels", ["structure", "llm"])
def test_a_run_whose_slm_cannot_learn_the_llm_takes_its_clusters_vote(weak_labels, scripted_llm, tmp_path):
    texts = [t for pair in zip(COOKING, SPORT, strict=True) for t in pair]
    truth = ["cooking" if t in COOKING else "sport" for t in texts]
    annotator = CachedAnnotator(scripted_llm(leaning_annotator), CallCache(tmp_path / "cache.sqlite"))
    loop = LoopConfig(initial_demos="none", refinery_rounds=1, min_kappa=0.6, weak_labels=weak_labels)
    slm = SLMConfig(
        mode="head", backbone="all-minilm-l6-v2", epochs=4, warmup_epochs=1, cross_fit=2, device="cpu"
    )
    runner = FreeAL(TOPICS, slm=slm, loop=loop, run_dir=tmp_path / "run", annotator=annotator, progress=False)
    frame = runner.fit(texts)
    llm_right = np.mean([a == b for a, b in zip(frame["llm_label"], truth, strict=True)])
    assert llm_right == pytest.approx(0.6)  # four sport texts of twenty answered `sport`
    final = json.loads((runner.run_dir / "final/step.json").read_text())
    assert final["kappa"] < 0.6 and final["slm_weight"] == 0.0
    note = runner.report_["notes"][-1]
    if weak_labels == "structure":
        assert final["rule"] == "structure" and "clusters" in note
        page = (runner.run_dir / "report.html").read_text()
        assert html.escape("final (texts' clusters)") in page and html.escape(note) in page
        assert frame["label"].tolist() == truth
        # clean/noisy then describes the final labels: the split the SLM to deploy made of them
        split = read_jsonl(runner.run_dir / "final/slm/predictions.jsonl")
        assert frame["clean"].tolist() == [p["clean"] for p in split]
        assert final["changed_from_llm"] == 16
    else:
        assert final["rule"] == "llm" and note.startswith("The final labels are the LLM's alone")
        page = (runner.run_dir / "report.html").read_text()
        assert html.escape("final (LLM)") in page
        assert frame["label"].tolist() == frame["llm_label"].tolist()

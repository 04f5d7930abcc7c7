"""The final label: the LLM's and the SLM's opinions weighed together, and how far its confidence holds."""

from __future__ import annotations

import numpy as np
import pytest

from freeal.config import SLMConfig
from freeal.data import Sentences, read_items
from freeal.kinds import kind_of
from freeal.loop import agreement_kappa, calibration
from freeal.tasks import Task, load_task

TASK = Task(name="t", description="d", labels={"a": "first", "b": "second", "c": "third"})


def _llm(p: list[float], label: str | None = None) -> dict:
    probs = dict(zip("abc", p, strict=True))
    return {"label": label or max(probs, key=probs.get), "confidence": max(p), "probs": probs}


def _slm(p: list[float]) -> dict:
    probs = dict(zip("abc", p, strict=True))
    return {"predicted": max(probs, key=probs.get), "confidence": max(p), "probs": probs}


def test_each_opinion_wins_where_it_is_sure_and_the_other_is_not():
    kind = kind_of(TASK)
    rows = [
        _llm([0.45, 0.40, 0.15]),  # LLM unsure and wrong (truth: b); the SLM is sure of b
        _llm([0.90, 0.05, 0.05]),  # LLM sure and right (a); the SLM leans to c, unsure
        _llm([0.10, 0.10, 0.80]),  # both agree: c
    ]
    fits = [_slm([0.05, 0.90, 0.05]), _slm([0.30, 0.30, 0.40]), _slm([0.10, 0.10, 0.80])]
    final, confidence = kind.combine(None, [(rows, fits)], slm_weight=1.0)
    assert final == ["b", "a", "c"]
    assert all(0 < c <= 1 for c in confidence)
    assert confidence[2] > rows[2]["confidence"]  # two opinions agreeing are surer than one


def test_weight_zero_or_no_slm_probabilities_keep_the_llm_answer():
    kind = kind_of(TASK)
    rows = [_llm([0.45, 0.40, 0.15])]
    fits = [_slm([0.05, 0.90, 0.05])]
    assert kind.combine(None, [(rows, fits)], slm_weight=0.0) == (["a"], [0.45])
    no_probs = [{"predicted": "b", "confidence": 0.9, "probs": None}]
    assert kind.combine(None, [(rows, no_probs)], 1.0) == (["a"], [0.45])


def test_an_abstention_takes_the_slm_label():
    kind = kind_of(TASK)
    rows = [{"label": None, "confidence": None, "probs": None}]
    final, confidence = kind.combine(None, [(rows, [_slm([0.2, 0.7, 0.1])])], slm_weight=0.5)
    assert final == ["b"]
    assert confidence[0] > 0.5


def test_calibration_of_a_known_case():
    right = np.asarray([True, True, False, True, False, False, True, True, True, True])
    confidence = [0.95, 0.95, 0.95, 0.95, 0.55, 0.55, 0.55, 0.55, 0.55, 0.55]
    out = calibration(right, confidence)
    # bin 0.9-1.0: 3 of 4 right at 0.95 (gap 0.2, weight 0.4); bin 0.5-0.6: 4 of 6 at 0.55 (gap 0.1167)
    assert out["ece"] == pytest.approx(0.4 * 0.2 + 0.6 * abs(4 / 6 - 0.55))
    # the four at 0.95 (3 right), then the 0.55 ones in order: (F), then (F, T, T) for the top 80%
    assert out["top50_accuracy"] == pytest.approx(3 / 5)
    assert out["top80_accuracy"] == pytest.approx(5 / 8)
    assert out["n"] == 10
    assert calibration(right[:2], [None, None])["ece"] is None


def test_cross_fitting_disagrees_with_labels_a_model_would_memorise(data_dir):
    """Labels flipped on purpose: the SLM's own predictions mostly repeat them, the held-out ones don't."""
    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "train.jsonl", task=task, limit=160, seed=3)
    flipped = np.zeros(len(items), dtype=bool)
    flipped[::8] = True
    given = [
        ("positive" if g == "negative" else "negative") if f else g
        for f, g in zip(flipped, items.gold, strict=True)
    ]
    kind = kind_of(task)
    base = {
        "mode": "head",
        "backbone": "all-minilm-l6-v2",
        "epochs": 30,
        "warmup_epochs": 30,
        "device": "cpu",
    }
    own = kind.train(items, given, SLMConfig(**base, cross_fit=0, lr=3e-3), lambda _: None)
    held = kind.train(items, given, SLMConfig(**base, cross_fit=4, lr=3e-3), lambda _: None)
    assert held.proba is not None and held.proba.shape == (len(items), 2)
    assert held.probs(0) == pytest.approx(dict(zip(task.label_names, held.proba[0], strict=True)))
    own_agree = own.agree[flipped].mean()
    held_agree = held.agree[flipped].mean()
    assert held_agree < own_agree - 0.2
    assert held_agree < 0.5  # held out, most flipped labels are contradicted


def test_kappa_is_zero_for_chance_agreement_and_one_for_full():
    a = ["x", "y"] * 50
    assert agreement_kappa(a, a) == pytest.approx(1.0)
    assert agreement_kappa(a, ["x", "x", "y", "y"] * 25) == pytest.approx(0.0)
    assert agreement_kappa(a, [None] * 100) is None  # nothing to compare


NER_TASK = Task(name="n", kind="ner", description="d", labels={"Chemical": "drugs", "Disease": "illnesses"})


def test_ner_marks_a_phrase_where_the_llm_missed_what_it_marked_elsewhere():
    tokens = [
        ["Aspirin", "relieves", "acute", "pain", "."],
        ["aspirin", "was", "given", "."],
        ["They", "took", "aspirin", "for", "acute", "pain", "."],
        ["Lithium", "caused", "tremor", "."],
        ["lithium", "levels", "rose", "."],
        ["No", "lithium", "here", "."],
        ["Pain", "again", "."],
    ]
    llm = [
        [["Chemical", 0, 1], ["Disease", 2, 4]],
        [["Chemical", 0, 1]],
        [["Disease", 4, 6]],  # missed aspirin: marked in 2 of 3 places -> added
        [["Chemical", 0, 1], ["Disease", 2, 3]],
        [],  # lithium marked in 1 of 3 places -> not added
        [],
        None,  # not answered: stays unanswered
    ]
    sentences = Sentences([str(i) for i in range(len(tokens))], tokens, None, "test")
    kind = kind_of(NER_TASK)
    rows = [{"spans": s} for s in llm]
    final, confidence = kind.combine(sentences, [(rows, [{}] * len(rows))], slm_weight=0.5)
    assert final[2] == [["Chemical", 2, 3], ["Disease", 4, 6]]
    assert final[4] == [] and final[5] == []
    assert final[6] is None
    assert final[:2] == llm[:2] and final[3] == llm[3]
    assert confidence == [1.0] * 6 + [None]  # one opinion: every decision unanimous
    assert kind.combine(sentences, [(rows, [{}] * len(rows))], slm_weight=0.0)[0] == llm


def test_ner_final_entities_are_a_weighted_vote_of_every_round():
    tokens = [["Aspirin", "eased", "the", "migraine", "attack", "."], ["Nothing", "here", "."]]
    sentences = Sentences(["a", "b"], tokens, None, "test")
    kind = kind_of(NER_TASK)
    aspirin, migraine, attack = ["Chemical", 0, 1], ["Disease", 3, 4], ["Disease", 3, 5]
    round0 = ([{"spans": [aspirin, migraine]}, {"spans": []}], [{"predicted": [aspirin]}, {"predicted": []}])
    # refinery dropped aspirin (the tagger still holds it) and widened the disease
    round1 = ([{"spans": [attack]}, {"spans": [["Disease", 0, 1]]}], [{"predicted": [aspirin, migraine]}, {}])
    final, confidence = kind.combine(sentences, [round0, round1], slm_weight=0.5)
    # of 3 (1 + 0.5 + 1 + 0.5): aspirin 2, migraine 1.5 (half: kept), attack 1 (and it overlaps)
    assert final[0] == [aspirin, migraine]
    assert confidence[0] == pytest.approx(0.5)  # the least clear decision: migraine, 1.5 of 3
    # sentence b: the second tagger opinion is missing (weights 2.5); "Nothing" 1 of 2.5 -> dropped
    assert final[1] == [] and confidence[1] == pytest.approx(1.5 / 2.5)
    assert kind.combine(sentences, [round0, round1], slm_weight=0.0)[0] == [[attack], [["Disease", 0, 1]]]

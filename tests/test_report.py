"""The run report (freeal.report) on a small hand-made run folder, with and without gold labels.

The folder has the files the loop writes (run.json, items.jsonl, per round the LLM's labels, the
SLM's predictions and the steps' step.json; the final answers), so no model runs: the page is
checked for what it must tell a reader. Without gold it must still say how the labels moved, how
often the SLM agrees, how confident both are and which texts to check, and claim no accuracy.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

from freeal.report import collect, has_gold, table, write_html

TEXTS = ["a fine film", "dull and long", "not bad at all", "what a mess", "oddly moving", "meh"]
# per round the LLM's labels; text 2 flips twice, text 5 once
LLM = [
    ["positive", "negative", "negative", "negative", "positive", "negative"],
    ["positive", "negative", "positive", "negative", "positive", "positive"],
    ["positive", "negative", "negative", "negative", "positive", "positive"],
]
SLM = ["positive", "negative", "positive", "negative", "negative", "positive"]
FINAL_CONFIDENCE = [0.97, 0.93, 0.85, 0.9, 0.62, 0.55]
GOLD = ["positive", "negative", "positive", "negative", "positive", "negative"]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _step(path: Path, step: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seconds": 1.5, "llm_usage": {"calls": 3, "cache_hits": 2}, **step}))


def _metrics(labels: list[str]) -> dict:
    right = sum(g == x for g, x in zip(GOLD, labels, strict=True))
    confusion = [
        [sum(g == a and x == b for g, x in zip(GOLD, labels, strict=True)) for b in ("negative", "positive")]
        for a in ("negative", "positive")
    ]
    return {
        "n": len(GOLD),
        "accuracy": right / len(GOLD),
        "labels": ["negative", "positive"],
        "confusion": confusion,
    }


def make_run(folder: Path, gold: bool) -> Path:
    """A two-refinery run folder as the loop leaves it; ``gold`` adds what only gold can give."""
    scored = (lambda labels: {"metrics": _metrics(labels)}) if gold else (lambda labels: {})
    task = {"name": "toy", "kind": "classification", "labels": {"negative": "", "positive": ""}}
    (folder / "run.json").parent.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"task": task, "texts": {"n": len(TEXTS)}}))
    _jsonl(folder / "items.jsonl", [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)])
    for r, labels in enumerate(LLM):
        changed = [r > 0 and x != y for x, y in zip(LLM[r - 1], labels, strict=True)]
        _jsonl(
            folder / f"round-{r}/llm/labels.jsonl",
            [
                {"id": str(i), "label": x, "confidence": 0.6 + 0.05 * i, "changed": c}
                for i, (x, c) in enumerate(zip(labels, changed, strict=True))
            ],
        )
        _step(
            folder / f"round-{r}/llm/step.json",
            {"round": r, "asked": 6 if r == 0 else 2, "changed_share": sum(changed) / 6, **scored(labels)},
        )
        _jsonl(
            folder / f"round-{r}/slm/predictions.jsonl",
            [
                {"id": str(i), "predicted": p, "confidence": 0.7, "agree": p == x, "clean": p == x}
                for i, (p, x) in enumerate(zip(SLM, labels, strict=True))
            ],
        )
        slm = {"transductive": _metrics(SLM), "clean_precision": 1.0} if gold else {}
        _step(folder / f"round-{r}/slm/step.json", {"round": r, "noisy_share": 0.25, **slm})
        if r < len(LLM) - 1:
            _step(folder / f"round-{r}/feedback/step.json", {"round": r, "kappa": 0.4})
    final = list(LLM[-1])
    final[4] = "negative"  # the SLM outweighs the LLM on text 4
    _jsonl(
        folder / "final/answers.jsonl",
        [
            {"id": str(i), "label": x, "confidence": c}
            for i, (x, c) in enumerate(zip(final, FINAL_CONFIDENCE, strict=True))
        ],
    )
    _step(
        folder / "final/step.json", {"round": 2, "rule": "combined", "changed_from_llm": 1, **scored(final)}
    )
    return folder


@pytest.fixture
def no_gold(tmp_path: Path) -> tuple[dict, str]:
    report = collect(make_run(tmp_path / "run", gold=False))
    return report, write_html(report, tmp_path / "report.html").read_text()


@pytest.fixture
def with_gold(tmp_path: Path) -> tuple[dict, str]:
    report = collect(make_run(tmp_path / "run", gold=True))
    return report, write_html(report, tmp_path / "report.html").read_text()


def _visible(page: str) -> str:
    """The page's text and image captions, without the embedded images' base64."""
    return re.sub(r'src="data:[^"]*"', "", page)


def test_collect_reads_agreement_confidence_and_the_texts_to_check(no_gold):
    report, _ = no_gold
    assert [rd["agreement"] for rd in report["rounds"]] == pytest.approx([3 / 6, 5 / 6, 4 / 6])
    assert sum(report["rounds"][0]["confidence"]["LLM"]) == len(TEXTS)
    assert sum(report["final_confidence"]) == len(TEXTS)
    ex = report["examples"]
    assert ex["stages"] == ["initial round", "refinery 1", "refinery 2", "final"]
    assert ex["confidence_of"] == "final labels"
    assert [x["text"] for x in ex["least_confident"][:2]] == ["meh", "oddly moving"]
    assert ex["most_changed"][0]["text"] == "not bad at all"
    assert ex["most_changed"][0]["labels"] == ["negative", "positive", "negative", "negative"]
    assert ex["most_changed"][0]["changes"] == 2
    assert "a fine film" not in [x["text"] for x in ex["most_changed"]]  # never changed


def test_without_gold_the_page_shows_movement_agreement_confidence_and_no_accuracy(no_gold):
    report, page = no_gold
    assert not has_gold(report)
    text = _visible(page)
    for shown in (
        "No gold labels",
        "LLM=SLM",
        "50.0%",  # round 0's agreement, in the table
        "Label changes and estimated noise per round",
        "LLM-SLM agreement per round",
        "Confidence (log scale) of the LLM answers, SLM predictions, final labels",
        "Texts to check first",
        "Least confident",
        "Changed most often",
        "not bad at all",
        "3 (+2 cached)",  # cost per stage: LLM calls and answers from the cache
    ):
        assert shown in text, shown
    for claim in ("accuracy", "acc./f1", "confusion", "against gold", "slm test", "clean prec."):
        assert claim not in text.lower(), claim
    assert "labels acc./F1" not in [c.header for c in table(report).columns]  # nor in the terminal


def test_with_gold_the_page_shows_accuracy_and_confusion_matrices(with_gold):
    report, page = with_gold
    assert has_gold(report)
    text = _visible(page)
    for shown in (
        "Accuracy per round (against gold)",
        "labels acc./F1",
        "Confusion matrix of the final labels",
    ):
        assert shown in text, shown
    assert "0.833" in text and "0.500" in text  # round 0's labels: 5 of 6 right; the final ones: 3
    assert "Texts to check first" in text  # the gold-free parts stay


def test_the_page_is_self_contained_and_its_images_decode(with_gold):
    _, page = with_gold
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) >= 5
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "http://" not in page and "https://" not in page and "<script" not in page


@pytest.mark.skipif(shutil.which("/usr/bin/chromium") is None, reason="no /usr/bin/chromium")
def test_the_no_gold_page_renders_in_chromium_without_errors(no_gold, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    from report_screenshot import ARGS, CHROMIUM, look

    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        seen = look(browser.new_page(), tmp_path / "report.html", "toy", tmp_path)
        browser.close()
    assert seen.problems == []
    assert seen.png.stat().st_size > 10_000

"""The FreeAL loop end to end on a small real slice with the small real model (SmolLM2-135M).

The model is near chance, so these tests check the loop's behaviour (rounds, who is asked, resume,
report), not label quality; quality is measured in bench/loop.py.
"""

from __future__ import annotations

import html
import json
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest

from freeal.config import LoopConfig, SLMConfig
from freeal.data import read_items, read_jsonl
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.loop import FreeAL
from freeal.tasks import load_task

SLM = SLMConfig(
    mode="head", backbone="all-minilm-l6-v2", epochs=6, warmup_epochs=2, cross_fit=2, device="cpu"
)
LOOP = LoopConfig(
    demos_per_label=2,
    demos_per_call=2,
    max_calls_per_label=8,
    k=6,
    group_size=12,
    initial_demos="generated",
    refinery_rounds=2,
    min_change=0,
    min_kappa=-1.0,  # SmolLM2 is near chance: refine anyway, these tests check the plumbing
)
# the kills after the demonstration step: the same loop from zero-shot labels (SmolLM2 spends 65 of
# the 85 s of a run with written demonstrations writing them)
ZERO_SHOT = LOOP.model_copy(update={"initial_demos": "none"})
STEPS = [
    "demos",
    "round-0/llm",
    "round-0/slm",
    "round-0/feedback",
    "round-1/llm",
    "round-1/slm",
    "round-1/feedback",
    "round-2/llm",
    "round-2/slm",
    "final",
    "final/slm",
]


class Killer:
    """The real annotator, killed (KeyboardInterrupt, as Ctrl-C or a dying process) after ``after``
    answers that it had to compute: everything answered before is already in the cache.

    The kill lands before the next answer is computed, so the model's cache holds what it held at
    that point of the uninterrupted run, and the resumed run evaluates the next prompt on the same
    prefix. Killed while computing it instead, the resumed run would score that prompt on a prefix
    held up to its last token, which moves SmolLM2's scores by up to 0.17 nats (llama.cpp rounds a
    one-token tail otherwise than a longer one) and flips its near ties: a difference of rounding,
    not of resuming, which this test is about (BENCHMARKS.md, demonstration writing in rounds)."""

    def __init__(self, inner, after: int) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.after, self.identity = inner, after, inner.identity

    def _count(self, stream: Iterator) -> Iterator:
        while True:
            if self.after <= 0:
                raise KeyboardInterrupt("killed")
            pair = next(stream, None)
            if pair is None:
                return
            self.after -= 1
            yield pair

    def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
        return self._count(self.inner.score_many(prompts, labels))

    def generate_many(self, prompts, **kw):  # type: ignore[no-untyped-def]
        return self._count(self.inner.generate_many(prompts, **kw))


@pytest.fixture(scope="module")
def smollm2(smollm2, one_per_call):  # type: ignore[no-untyped-def]
    """SmolLM2 one prompt per call: these tests compare resumed runs with the uninterrupted one."""
    return one_per_call(smollm2)


@pytest.fixture(scope="module")
def slice_(data_dir):
    # SmolLM2 (135M) often writes no usable list; on this slice it does for every TREC label
    task = load_task(data_dir / "trec")
    items = read_items(data_dir / "trec" / "train.jsonl", task=task, limit=24, seed=1)
    test = read_items(data_dir / "trec" / "test.jsonl", task=task, limit=30, seed=1)
    return task, items, test


def run(task, inner, cache, run_dir, loop=LOOP, **kw):  # type: ignore[no-untyped-def]
    annotator = CachedAnnotator(inner, CallCache(cache))
    runner = FreeAL(task, slm=SLM, loop=loop, run_dir=run_dir, annotator=annotator, progress=False, **kw)
    return runner, annotator


@pytest.fixture(scope="module")
def finished(slice_, smollm2, tmp_path_factory):
    task, items, test = slice_
    base = tmp_path_factory.mktemp("loop")
    loop, annotator = run(task, smollm2, base / "cache.sqlite", base / "run")
    frame = loop.fit(items, test=test)
    return loop, annotator, frame


@pytest.fixture(scope="module")
def finished_zero_shot(slice_, smollm2, tmp_path_factory):
    task, items, test = slice_
    base = tmp_path_factory.mktemp("loop-zero-shot")
    loop, annotator = run(task, smollm2, base / "cache.sqlite", base / "run", loop=ZERO_SHOT)
    frame = loop.fit(items, test=test)
    return loop, annotator, frame


def test_rounds_happen_and_every_step_is_written(finished):
    loop, annotator, frame = finished
    for step in STEPS:
        assert (loop.run_dir / step / "step.json").is_file(), step
    assert list(frame.columns[:6]) == ["id", "text", "label", "confidence", "clean", "round_changed"]
    assert len(frame) == 24 and set(frame["label"]) <= set(loop.task.label_names)
    assert frame["confidence"].between(0, 1).all()
    assert [r["round"] for r in loop.report_["rounds"]] == [0, 1, 2]
    assert loop.report_["totals"]["llm_calls"] == annotator.ledger.calls > 40
    saved = read_jsonl(loop.run_dir / "labels.jsonl")
    assert [r["label"] for r in saved] == frame["label"].tolist()
    assert loop.slm_.predict(["Who wrote Hamlet ?"])[0] in loop.task.label_names
    # the SLM handed back learned the final labels (the LLM's weighed with the SLM's)
    final = [r["label"] for r in read_jsonl(loop.run_dir / "final/answers.jsonl")]
    assert final != [r["label"] for r in read_jsonl(loop.run_dir / "round-2/llm/labels.jsonl")]
    assert loop.slm_path_ == loop.run_dir / "final/slm/model"
    assert loop.report_["deployed_slm"]["inductive"]["n"] == len(loop.test)
    # ... in the classifier's deployed mode (linear), while the rounds' SLM is the run's head
    modes = [
        json.loads((loop.run_dir / folder / "model/slm.json").read_text())["config"]["mode"]
        for folder in ("round-2/slm", "final/slm")
    ]
    assert modes == ["head", "linear"] and loop.loop_config.deployed_mode == "linear"


def test_refinery_asks_only_noisy_items_and_keeps_the_rest(finished):
    loop, _, _ = finished
    for r in (1, 2):
        before = pd.DataFrame(read_jsonl(loop.run_dir / f"round-{r - 1}/llm/labels.jsonl"))
        after = pd.DataFrame(read_jsonl(loop.run_dir / f"round-{r}/llm/labels.jsonl"))
        slm = pd.DataFrame(read_jsonl(loop.run_dir / f"round-{r - 1}/slm/predictions.jsonl"))
        position = {item_id: i for i, item_id in enumerate(loop.items.ids)}
        pool = {position[p["id"]] for p in read_jsonl(loop.run_dir / f"round-{r - 1}/feedback/pool.jsonl")}
        noisy = {position[p["id"]] for p in read_jsonl(loop.run_dir / f"round-{r - 1}/feedback/noisy.jsonl")}
        expected = [not c and i not in pool for i, c in enumerate(slm["clean"])]
        assert sorted(noisy) == [i for i, e in enumerate(expected) if e]
        assert after["asked"].tolist() == expected
        assert 0 < sum(expected) < 24
        kept = ~after["asked"]
        assert (after.loc[kept, "label"] == before.loc[kept, "label"]).all()
        changed = after["label"] != before["label"]
        assert (after["changed"] == changed).all()
        assert (after.loc[changed, "round_changed"] == r).all()
        groups = read_jsonl(loop.run_dir / f"round-{r}/llm/groups.jsonl")
        asked_ids = sorted(i for g in groups for i in g["items"])
        assert asked_ids == sorted(after.loc[after["asked"], "id"])
        pool_texts = {loop.items.texts[i] for i in pool}
        assert all(d["text"] in pool_texts for g in groups for d in g["demonstrations"])


def test_report_is_written_as_table_and_html(finished):
    loop, _, _ = finished
    page = (loop.run_dir / "report.html").read_text()
    assert "<table" in page and page.count("data:image/png;base64,") >= 3
    assert "refinery 2" in page and "initial round" in page
    report = json.loads((loop.run_dir / "report.json").read_text())
    assert report["rounds"][0]["slm"]["inductive"]["n"] == 30


def test_a_finished_run_is_returned_without_any_llm_call(finished, slice_, smollm2):
    loop, _, frame = finished
    task, items, test = slice_
    again, annotator = run(task, smollm2, loop.run_dir.parent / "cache.sqlite", loop.run_dir)
    pd.testing.assert_frame_equal(again.fit(items, test=test), frame)
    assert annotator.ledger.calls == 0 and annotator.ledger.cache_hits == 0


def _calls_before(report: dict, step: str) -> int:
    order = [report["demos"], *(x for rd in report["rounds"] for x in (rd["llm"], rd["slm"]))]
    total = 0
    for s in filter(None, order):  # no demos step in a zero-shot run
        if s["step"] == step:
            return total
        total += s.get("llm_usage", {}).get("calls", 0)
    raise AssertionError(step)


# written demonstrations, a refinery pass, and a step boundary (the kill as an SLM step starts; these
# two in a run from zero-shot labels);
# a kill inside the initial round takes the refinery's path (one scoring pass), and random kills
# anywhere are tests/test_faults.py's
@pytest.mark.parametrize("step", ["demos", "round-0/slm", "round-1/llm"])
def test_killed_run_resumes_without_repeating_llm_calls(step, request, slice_, smollm2, tmp_path):
    cfg, reference = (LOOP, "finished") if step == "demos" else (ZERO_SHOT, "finished_zero_shot")
    loop, full, frame = request.getfixturevalue(reference)
    task, items, test = slice_
    cache, run_dir = tmp_path / "cache.sqlite", tmp_path / "run"
    if step.endswith("slm"):  # no LLM call inside: kill as the step starts

        def say(message: str) -> None:
            if message == f"step {step}":
                raise KeyboardInterrupt("killed")

        first, killed = run(task, smollm2, cache, run_dir, loop=cfg, say=say)
    else:
        halfway = _calls_before(loop.report_, step) + 2
        first, killed = run(task, Killer(smollm2, halfway), cache, run_dir, loop=cfg)
    with pytest.raises(KeyboardInterrupt):
        first.fit(items, test=test)
    assert not (run_dir / "labels.jsonl").exists()
    resumed, again = run(task, smollm2, cache, run_dir, loop=cfg)
    result = resumed.fit(items, test=test)
    assert killed.ledger.calls + again.ledger.calls == full.ledger.calls
    assert killed.ledger.calls > 0
    # Batched scoring equals one-by-one scoring only to numerical tolerance, and the texts answered
    # after the kill share a decode with other texts than in the uninterrupted run: the LLM's answers
    # must be the same and its probabilities close; a final label may differ only on a near tie
    # (seen: one TREC text at 0.25 confidence among six labels, LLM probability 0.231 against 0.240).
    columns = ["id", "llm_label", "round_changed"]
    pd.testing.assert_frame_equal(result[columns], frame[columns])
    llm = [pd.to_numeric(f["llm_confidence"]).to_numpy(dtype=float) for f in (result, frame)]
    assert np.allclose(*llm, atol=0.02, equal_nan=True)
    differ = (result["label"] != frame["label"]).to_numpy()
    assert differ.sum() <= 1 and (frame["confidence"].to_numpy()[differ] < 0.5).all()


def test_a_run_folder_refuses_other_settings(finished, slice_, smollm2):
    loop, _, _ = finished
    task, items, test = slice_
    other = FreeAL(task, slm=SLM, loop=LOOP.model_copy(update={"k": 2}), run_dir=loop.run_dir, progress=False)
    with pytest.raises(FreeALError, match=r"loop\.k"):
        other.fit(items, test=test)


def test_lists_and_dataframes_are_accepted(slice_, smollm2, tmp_path):
    task, items, _ = slice_
    loop_cfg = LOOP.model_copy(update={"refinery_rounds": 0, "initial_demos": "none"})  # inputs only
    texts = items.texts[:16]
    a, _ = run(task, smollm2, tmp_path / "c.sqlite", tmp_path / "a", loop=loop_cfg)
    from_list = a.fit(texts)
    b, _ = run(task, smollm2, tmp_path / "c.sqlite", tmp_path / "b", loop=loop_cfg)
    from_frame = b.fit(pd.DataFrame({"id": [f"t{i}" for i in range(16)], "text": texts}))
    assert from_list["label"].tolist() == from_frame["label"].tolist()
    assert from_list["id"].tolist() == [str(i) for i in range(16)]
    assert from_frame["id"].tolist() == [f"t{i}" for i in range(16)]
    assert b.report_["rounds"][0]["llm"]["metrics"] is None  # no gold: nothing scored


def test_config_errors_are_reported_before_any_work(data_dir, tmp_path):
    good = {
        "task": str(data_dir / "sst2"),
        "data": {"path": str(data_dir / "sst2" / "train.jsonl"), "limit": 10},
        "out": str(tmp_path / "run"),
    }
    cases = {
        "unknown key": ({**good, "loop": {"refinery_roundz": 1}}, "loop.refinery_roundz"),
        "bad value": ({**good, "loop": {"k": -1}}, "loop.k"),
        "bad slm value": ({**good, "slm": {"mode": "fast"}}, "slm.mode"),
        "missing file": ({**good, "data": {"path": str(tmp_path / "nope.jsonl")}}, "nope.jsonl"),
    }
    for name, (raw, expected) in cases.items():
        path = tmp_path / "run.yaml"
        path.write_text(json.dumps(raw))  # JSON is YAML
        result = subprocess.run(
            [sys.executable, "-m", "freeal", "run", str(path)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, name
        assert "error:" in result.stderr and expected in result.stderr, (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "run").exists(), name


def test_run_command_end_to_end_with_relative_paths(data_dir, tmp_path):
    """`freeal run` on a config whose paths are relative to the config file."""
    config = tmp_path / "cfg" / "run.yaml"
    config.parent.mkdir()
    config.write_text(
        f"""
task: {data_dir / "trec"}
data: {{path: {data_dir / "trec" / "train.jsonl"}, limit: 30, seed: 2}}
test: {{path: {data_dir / "trec" / "test.jsonl"}, limit: 20}}
out: ../out
llm: {{model: smollm2-135m, cache_path: ../cache.sqlite, calibrate: off}}
slm: {{mode: head, epochs: 3, warmup_epochs: 1, device: cpu}}
# SmolLM2 is near chance: min_kappa -1 lets refinery run, this test checks the plumbing
loop: {{initial_demos: none, k: 6, group_size: 12, refinery_rounds: 1, min_kappa: -1}}
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "freeal", "run", str(config), "--quiet"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert (out / "report.html").is_file() and (tmp_path / "cache.sqlite").is_file()
    assert "refinery 1" in result.stderr and "report.html" in result.stderr
    labels = read_jsonl(out / "labels.jsonl")
    assert len(labels) == 30
    assert not (out / "demos").exists()  # the initial round was zero-shot
    groups = read_jsonl(out / "round-1/llm/groups.jsonl")
    assert all(len({d["label"] for d in g["demonstrations"]}) >= 2 for g in groups)  # balanced over the pool
    assert np.isfinite([r["confidence"] for r in labels]).all()


def test_combined_refinery_label_needs_the_new_answer_to_outweigh_the_old():
    from freeal.kinds.base import Answers
    from freeal.kinds.classification import Classification
    from freeal.tasks import Task

    kind = Classification(Task(name="t", description="d", labels={"a": "A", "b": "B"}))
    old_probs = [{"a": 0.9, "b": 0.1}, {"a": 0.6, "b": 0.4}, {"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}]
    previous = [
        {"label": max(p, key=p.get), "confidence": max(p.values()), "probs": p, "log_scores": [0, 0]}
        for p in old_probs
    ]
    fresh = Answers(
        values=["b", "b", "a", None],  # the last one abstained
        asked=np.array([True, True, False, True]),
        columns={
            "confidence": [0.7, 0.9, 0.8, None],
            "probs": [{"a": 0.3, "b": 0.7}, {"a": 0.1, "b": 0.9}, {"a": 0.8, "b": 0.2}, None],
            "log_scores": [[1, 2], [1, 3], [2, 1], None],
        },
    )
    out = [kind.merge(old, fresh, i, "combined") for i, old in enumerate(previous)]
    assert [r["label"] for r in out] == ["a", "b", "a", "b"]  # weak new "b" loses to a strong old "a"
    assert out[0]["probs"]["a"] == pytest.approx(0.27 / 0.34)
    assert out[1]["confidence"] == pytest.approx(0.36 / 0.42)
    assert out[2]["probs"] == {"a": 0.9, "b": 0.1}  # not asked: untouched
    assert out[3] == {k: previous[3][k] for k in ("label", "confidence", "probs", "log_scores")}  # abstained
    assert [kind.merge(old, fresh, i, "new")["label"] for i, old in enumerate(previous)] == [
        "b",
        "b",
        "a",
        "b",
    ]


def test_disagree_refinery_asks_where_the_held_out_slm_differs(slice_, smollm2, tmp_path):
    task, items, _ = slice_
    loop = LOOP.model_copy(update={"initial_demos": "none", "refinery_rounds": 1, "refine": "disagree"})
    runner, _ = run(task, smollm2, tmp_path / "cache.sqlite", tmp_path / "run", loop=loop)
    frame = runner.fit(items)
    folder = runner.run_dir
    fit = read_jsonl(folder / "round-0/slm/predictions.jsonl")
    before = read_jsonl(folder / "round-0/llm/labels.jsonl")
    pool = {p["id"] for p in read_jsonl(folder / "round-0/feedback/pool.jsonl")}
    expected = [
        b["id"]
        for b, p in zip(before, fit, strict=True)
        if b["id"] not in pool and p["predicted"] != b["label"]
    ]
    assert [r["id"] for r in read_jsonl(folder / "round-0/feedback/noisy.jsonl")] == expected
    asked = [r["id"] for r in read_jsonl(folder / "round-1/llm/labels.jsonl") if r["asked"]]
    assert asked == expected
    # the final label weighs the LLM's last answer with the held-out SLM; llm_label keeps the former
    last = read_jsonl(folder / "round-1/llm/labels.jsonl")
    assert frame["llm_label"].tolist() == [r["label"] for r in last]
    assert (folder / "final" / "answers.jsonl").is_file()


def test_refinery_asks_no_one_when_the_slm_cannot_learn_the_llm(slice_, smollm2, tmp_path):
    task, items, _ = slice_
    loop = LOOP.model_copy(update={"initial_demos": "none", "refinery_rounds": 1, "min_kappa": 0.99})
    runner, _ = run(task, smollm2, tmp_path / "cache.sqlite", tmp_path / "run", loop=loop)
    runner.fit(items)
    feedback = json.loads((runner.run_dir / "round-0/feedback/step.json").read_text())
    assert feedback["kappa"] < 0.99 and "kappa" in feedback["skipped"]
    assert feedback["noisy"] == 0
    # so no refinery round follows: its SLM would learn the same labels again
    assert not (runner.run_dir / "round-1").exists() and len(runner.report_["rounds"]) == 1
    # nor do the final labels weigh in an SLM that learned nothing: they are the LLM's answers
    final = json.loads((runner.run_dir / "final/step.json").read_text())
    assert final["round"] == 0
    assert final["slm_weight"] == 0.0 and final["kappa"] < 0.99 and final["changed_from_llm"] == 0
    first = read_jsonl(runner.run_dir / "round-0/llm/labels.jsonl")
    assert runner.labels_["label"].tolist() == [r["label"] for r in first]
    # and the report says both, where the table only lacks the rows
    notes = runner.report_["notes"]
    assert len(notes) == 2 and all("too weakly" in n for n in notes)
    # nor does the vote of the texts' clusters replace them: on these questions its check fails
    assert "clusters predict the LLM's most distinctive answers too weakly" in notes[1]
    page = (runner.run_dir / "report.html").read_text()
    assert all(html.escape(n) in page for n in notes)


def test_a_refinery_round_that_changes_few_labels_is_the_last(slice_, smollm2, tmp_path):
    """``min_change``: once a round changes fewer than that share of the labels, no round follows;
    the final labels come from that round's answers and SLM."""
    task, items, _ = slice_
    loop = LOOP.model_copy(update={"initial_demos": "none", "refinery_rounds": 3, "min_change": 1.0})
    said: list[str] = []
    runner, _ = run(task, smollm2, tmp_path / "cache.sqlite", tmp_path / "run", loop=loop, say=said.append)
    runner.fit(items)
    folder = runner.run_dir
    assert json.loads((folder / "round-1/llm/step.json").read_text())["changed_share"] < 1.0
    assert (folder / "round-1/slm/step.json").is_file() and not (folder / "round-1/feedback").exists()
    assert not (folder / "round-2").exists()
    assert "labels settled after round 1: stopping" in said
    assert json.loads((folder / "final/step.json").read_text())["round"] == 1
    assert [r["round"] for r in runner.report_["rounds"]] == [0, 1]
    # the report says why it has two rounds of the four asked for
    assert any("ended after round 1" in n and "min_change 100.0%" in n for n in runner.report_["notes"])


def test_each_labeled_row_keeps_its_own_raw_scores(scripted_llm, tmp_path):
    """``log_scores`` is each text's own answer (it once held the last answer of the pass for all)."""
    from freeal.annotate import label_groups
    from freeal.tasks import Task

    task = Task(name="s", description="Sentiment.", labels={"negative": "bad", "positive": "good"})
    texts = ["good fun", "bad acting", "good story"]
    llm = scripted_llm(lambda text, labels: "positive" if "good" in text else "negative")
    annotator = CachedAnnotator(llm, CallCache(tmp_path / "c.sqlite"))
    frame = label_groups(task, texts, annotator, [(range(3), ())], calibrate="off", progress=False)
    assert frame["log_scores"].tolist() == [[-3.0, 0.0], [0.0, -3.0], [-3.0, 0.0]]


def test_prompts_are_built_as_the_backend_reads_them(scripted_llm, tmp_path, monkeypatch):
    """A pass builds each prompt when the backend reads it, not all of them first: at a million
    texts every prompt holds its group's demonstrations, and a list of them all filled gigabytes."""
    import freeal.annotate as annotate
    from freeal.tasks import Task

    built = []
    make = annotate.classification_prompt
    monkeypatch.setattr(annotate, "classification_prompt", lambda *a, **k: built.append(1) or make(*a, **k))
    seen_at_answer = []

    class Counting(scripted_llm):  # type: ignore[misc, valid-type]
        def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
            for answer in super().score_many(prompts, labels):
                seen_at_answer.append(len(built))
                yield answer

    task = Task(name="s", description="Sentiment.", labels={"negative": "bad", "positive": "good"})
    texts = [f"good fun {i}" for i in range(50)]
    annotator = CachedAnnotator(Counting(lambda text, labels: "positive"), CallCache(tmp_path / "c.sqlite"))
    frame = annotate.label_groups(task, texts, annotator, [(range(50), ())], calibrate="off", progress=False)
    assert frame["label"].tolist() == ["positive"] * 50
    # the cache key reads every prompt once up front (then drops it); the backend's reads follow
    assert seen_at_answer[0] <= 50 + 1 < seen_at_answer[-1]

"""Export for human audit and import back (issue 15): every export is read by its target's own
code (Label Studio's LabelInterface, Argilla's record and settings classes, ``datasets``, pandas),
and a person's labels, once imported, are final and never asked again."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from freeal.cli import app
from freeal.data import read_jsonl, write_jsonl_atomic, write_text_atomic
from freeal.errors import FreeALError
from freeal.export import HUMAN_LABELS, export_run, import_corrections, label_studio_config
from freeal.ner import render, tag_names, tags_from_spans
from freeal.tasks import Task

SENTIMENT = {
    "name": "sst2",
    "kind": "classification",
    "description": "Sentiment of a movie review sentence.",
    "labels": {"negative": "The text expresses a negative opinion.", "positive": "A positive one."},
    "scheme": None,
}
CHEMDIS = {
    "name": "bc5cdr",
    "kind": "ner",
    "description": "Chemical and disease mentions in biomedical abstracts.",
    "labels": {"Chemical": "a chemical or drug name", "Disease": "a disease, disorder or symptom"},
    "scheme": "IOB2",
}

# id, label, confidence, clean: the doubt order is c (no answer), b (0.55, noisy), e (0.55, clean),
# d, a, f; the noisy ones are c, b, f
TEXTS = [
    ("a", "a gorgeous , witty film .", "positive", 0.9, True),
    ("b", "it is not a bad movie , just a dull one .", "positive", 0.55, False),
    ("c", 'the plot & the "acting" <are> something else .', None, None, False),
    ("d", "a mess from start to finish .", "negative", 0.7, True),
    ("e", "i wanted to like it .", "negative", 0.55, True),
    ("f", "one of the year 's best .", "positive", 0.99, False),
]
DOUBT_ORDER = ["c", "b", "e", "d", "a", "f"]

# id, tokens, final spans (None: no answer), the tagger's spans, clean; doubt order s4, s2, s1, s3
SENTENCES = [
    ("s1", "Aspirin caused stomach bleeding .", [("Chemical", 0, 1), ("Disease", 2, 4)], None, True),
    ("s2", "Lithium - induced tremor was seen .", [("Chemical", 0, 1)], [("Disease", 3, 4)], False),
    ("s3", "No entity here .", [], None, True),
    ("s4", "Haloperidol and tardive dyskinesia .", None, [("Chemical", 0, 1)], False),
]
NER_ORDER = ["s4", "s2", "s1", "s3"]


def make_run(folder: Path, task: dict, rows: list[dict], items: list[dict]) -> Path:
    """A finished run folder as the loop leaves it (only what export and import read)."""
    write_text_atomic(folder / "run.json", json.dumps({"task": task, "models": {"annotator": "fake"}}))
    write_jsonl_atomic(folder / "items.jsonl", items)
    write_jsonl_atomic(folder / "labels.jsonl", rows)
    return folder


@pytest.fixture
def sentiment_run(tmp_path: Path) -> Path:
    rows = [
        {
            "id": i,
            "text": text,
            "label": label,
            "confidence": conf,
            "clean": clean,
            "round_changed": 0,
            "llm_label": label,
            "llm_confidence": conf,
            "slm_label": label or "negative",
            "slm_confidence": 0.8,
        }
        for i, text, label, conf, clean in TEXTS
    ]
    return make_run(tmp_path / "run", SENTIMENT, rows, [{"id": r["id"], "text": r["text"]} for r in rows])


@pytest.fixture
def ner_run(tmp_path: Path) -> Path:
    rows = []
    for i, sentence, spans, slm_spans, clean in SENTENCES:
        tokens = sentence.split()
        tags = None if spans is None else tags_from_spans(len(tokens), spans)
        slm_tags = tags_from_spans(len(tokens), spans if slm_spans is None else slm_spans)
        rows.append(
            {
                "id": i,
                "tokens": tokens,
                "tags": tags,
                "entities": None
                if spans is None
                else [{"type": k, "start": s, "end": e, "text": render(tokens[s:e])} for k, s, e in spans],
                "clean": clean,
                "round_changed": 0,
                "slm_tags": slm_tags,
                "slm_confidence": 0.9,
                "agreement": None if tags is None else sum(map(str.__eq__, tags, slm_tags)) / len(tags),
            }
        )
    items = [{"id": r["id"], "tokens": r["tokens"]} for r in rows]
    return make_run(tmp_path / "ner-run", CHEMDIS, rows, items)


# -- Label Studio ------------------------------------------------------------------------------------


def label_studio_check(config: str, tasks: list[dict]) -> None:
    """Validate the config, each task and each prediction with label-studio-sdk's own code."""
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    from label_studio_sdk.label_interface.objects import TaskValue

    interface = sdk.LabelInterface(config)
    interface.validate()  # the config's XML schema, names, toName links
    for task in tasks:
        TaskValue(**task)  # the task import format (data, predictions)
        assert interface.validate_task({"data": task["data"]})  # every $variable has data
        errors = interface.validate_prediction(task["predictions"][0], return_errors=True)
        assert errors == [], errors


@pytest.mark.parametrize("kind", ["classification", "ner"])
def test_label_studio_tasks_and_config_pass_label_studios_validation(kind, sentiment_run, ner_run):
    run = sentiment_run if kind == "classification" else ner_run
    done = export_run(run, "label-studio")
    assert done.path == run / "export" / "label-studio.json" and done.config is not None
    tasks = json.loads(done.path.read_text())
    label_studio_check(done.config.read_text(), tasks)
    assert [t["data"]["freeal_id"] for t in tasks] == (DOUBT_ORDER if kind == "classification" else NER_ORDER)
    scores = [t["predictions"][0]["score"] for t in tasks]
    assert scores == sorted(scores) and scores[0] == 0.0
    assert len({t["predictions"][0]["model_version"] for t in tasks}) == 1


def test_the_label_studio_check_rejects_a_label_outside_the_config(sentiment_run):
    done = export_run(sentiment_run, "label-studio")
    tasks = json.loads(done.path.read_text())
    tasks[1]["predictions"][0]["result"][0]["value"]["choices"] = ["neutral"]
    with pytest.raises(AssertionError, match="Invalid value"):
        label_studio_check(done.config.read_text(), tasks)


def test_ner_character_offsets_point_at_the_entity_text(ner_run):
    tasks = json.loads(export_run(ner_run, "label-studio").path.read_text())
    rows = {r["id"]: r for r in read_jsonl(ner_run / "labels.jsonl")}
    seen = 0
    for task in tasks:
        text, row = task["data"]["text"], rows[task["data"]["freeal_id"]]
        assert text == " ".join(row["tokens"])
        regions = task["predictions"][0]["result"]
        assert [r["value"]["text"] for r in regions] == [e["text"] for e in row["entities"] or []]
        for region in regions:
            value = region["value"]
            assert text[value["start"] : value["end"]] == value["text"]
            seen += 1
    assert seen == 3  # Aspirin, stomach bleeding, Lithium; nothing for s3 or the unanswered s4


def test_the_config_escapes_descriptions_and_labels():
    task = Task(
        name="t",
        description='Say "yes" & <mean> it',
        labels={"a<b": 'x "y"', "c&d": "z"},
        kind="classification",
    )
    config = label_studio_config(task)
    from xml.etree import ElementTree

    root = ElementTree.fromstring(config)
    assert [c.get("value") for c in root.iter("Choice")] == ["a<b", "c&d"]
    assert root.find("Header").get("value") == 'Say "yes" & <mean> it'


# -- order, --only-noisy, --limit ------------------------------------------------------------------


def test_only_noisy_and_limit_keep_the_most_doubtful(sentiment_run, ner_run):
    def ids(run: Path, **kw) -> list[str]:
        tasks = json.loads(export_run(run, "label-studio", out=run / "x.json", **kw).path.read_text())
        return [t["data"]["freeal_id"] for t in tasks]

    assert ids(sentiment_run, only_noisy=True) == ["c", "b", "f"]
    assert ids(sentiment_run, limit=2) == ["c", "b"]
    assert ids(sentiment_run, only_noisy=True, limit=2) == ["c", "b"]
    assert ids(ner_run, only_noisy=True) == ["s4", "s2"]
    with pytest.raises(FreeALError, match="limit must be 1 or more"):
        ids(sentiment_run, limit=0)


# -- Argilla ---------------------------------------------------------------------------------------


@pytest.fixture
def argilla():
    """The argilla SDK with an offline default client: its settings classes need one, and this
    one answers only the login check."""
    rg = pytest.importorskip("argilla")
    import httpx

    def me(request: httpx.Request) -> httpx.Response:
        user = {"id": str(uuid.uuid4()), "username": "reviewer", "role": "owner"}
        return httpx.Response(200, json={**user, "inserted_at": "2024-01-01T00:00:00"})

    url = "http://argilla.invalid"
    rg.Argilla(api_url=url, api_key="offline", mounts={url: httpx.MockTransport(me)})
    return rg


@pytest.mark.parametrize("kind", ["classification", "ner"])
def test_argilla_reads_the_settings_and_records(kind, sentiment_run, ner_run, argilla):
    run = sentiment_run if kind == "classification" else ner_run
    folder = export_run(run, "argilla").path
    settings = argilla.Settings.from_json(folder / ".argilla" / "settings.json")
    settings.validate()
    question = settings.questions["label"]
    assert isinstance(question, argilla.SpanQuestion if kind == "ner" else argilla.LabelQuestion)
    assert question.labels == list((CHEMDIS if kind == "ner" else SENTIMENT)["labels"])
    raw = json.loads((folder / "records.json").read_text())
    records = [argilla.Record.from_dict(r) for r in raw]
    assert [r.id for r in records] == (NER_ORDER if kind == "ner" else DOUBT_ORDER)
    assert [r.metadata["freeal_rank"] for r in records] == list(range(1, len(records) + 1))
    assert [r.to_dict() for r in records] == raw  # nothing of the file lost or renamed
    suggested = 0
    for record in records:
        for suggestion in record.suggestions:
            suggested += 1
            assert suggestion.question_name == "label" and 0 <= suggestion.score <= 1
            if kind == "ner":
                text = record.fields["text"]
                assert all(text[s["start"] : s["end"]].strip() for s in suggestion.value)
                assert {s["label"] for s in suggestion.value} <= set(question.labels)
            else:
                assert suggestion.value in question.labels
    assert suggested == (2 if kind == "ner" else 5)  # no suggestion without an answer or entity
    dataset = json.loads((folder / ".argilla" / "dataset.json").read_text())
    argilla.Dataset(name=dataset["name"], settings=settings)  # the name Argilla's from_disk gives it


# -- datasets and CSV ------------------------------------------------------------------------------


def test_datasets_folder_has_classlabel_features(sentiment_run, ner_run):
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_from_disk(str(export_run(sentiment_run, "datasets").path))
    assert loaded.features["label"].names == ["negative", "positive"]
    assert loaded["id"] == DOUBT_ORDER
    labels = dict(zip(loaded["id"], loaded["label"], strict=True))
    assert labels["c"] is None and loaded.features["label"].int2str(labels["a"]) == "positive"
    assert loaded["confidence"] == sorted(loaded["confidence"])

    tagged = datasets.load_from_disk(str(export_run(ner_run, "datasets").path))
    tag_feature = tagged.features["ner_tags"].feature
    assert tag_feature.names == tag_names(["Chemical", "Disease"])
    assert tagged["id"] == NER_ORDER
    s1 = tagged[NER_ORDER.index("s1")]
    assert tag_feature.int2str(s1["ner_tags"]) == ["B-Chemical", "O", "B-Disease", "I-Disease", "O"]


def test_a_second_export_replaces_only_an_earlier_export(sentiment_run, tmp_path):
    export_run(sentiment_run, "datasets", out=tmp_path / "ds", limit=1)
    export_run(sentiment_run, "datasets", out=tmp_path / "ds", limit=2)
    datasets = pytest.importorskip("datasets")
    assert len(datasets.load_from_disk(str(tmp_path / "ds"))) == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FreeALError, match="is not an earlier argilla export"):
        export_run(sentiment_run, "argilla", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_datasets_missing_names_the_extra(sentiment_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(FreeALError, match=r"pip install 'freeal\[hub\]'"):
        export_run(sentiment_run, "datasets")


def test_csv_reads_back_with_pandas(sentiment_run, ner_run):
    frame = pd.read_csv(export_run(sentiment_run, "csv").path, keep_default_na=False)
    assert frame["id"].tolist() == DOUBT_ORDER
    assert frame["text"].tolist() == [dict((t[0], t[1]) for t in TEXTS)[i] for i in DOUBT_ORDER]
    assert frame["confidence"].is_monotonic_increasing
    tagged = pd.read_csv(export_run(ner_run, "csv", only_noisy=True).path)
    assert tagged["id"].tolist() == ["s4", "s2"]
    lithium = tagged.set_index("id").loc["s2"]
    assert lithium["text"] == "Lithium - induced tremor was seen ."
    assert json.loads(lithium["entities"]) == [{"type": "Chemical", "start": 0, "end": 1, "text": "Lithium"}]


def test_an_unknown_format_or_an_unfinished_run_is_one_clear_error(sentiment_run, tmp_path):
    with pytest.raises(FreeALError, match="unknown export format 'excel'"):
        export_run(sentiment_run, "excel")
    (sentiment_run / "labels.jsonl").unlink()
    with pytest.raises(FreeALError, match="has not finished"):
        export_run(sentiment_run, "csv")
    with pytest.raises(FreeALError, match="not a freeal run folder"):
        export_run(tmp_path, "csv")


# -- import ----------------------------------------------------------------------------------------


def reviewed(tasks: list[dict], answers: dict[str, list[dict] | None], stamp: str = "10:00") -> list[dict]:
    """Label Studio's JSON export of a project made from ``tasks``, after a person worked on it:
    ``answers`` maps an item to its annotation's result (``None``: the person skipped it, which
    Label Studio keeps as a cancelled annotation); other tasks have no annotation."""
    out = []
    for n, task in enumerate(tasks, 1):
        item = task["data"]["freeal_id"]
        annotations = []
        if item in answers:
            annotations.append(
                {
                    "id": n,
                    "completed_by": 1,
                    "result": [
                        {"id": f"r{n}-{k}", "origin": "manual", **r}
                        for k, r in enumerate(answers[item] or [])
                    ],
                    "was_cancelled": answers[item] is None,
                    "ground_truth": False,
                    "created_at": f"2024-05-01T{stamp}:00.000000Z",
                    "updated_at": f"2024-05-01T{stamp}:00.000000Z",
                    "lead_time": 4.2,
                    "task": n,
                    "project": 1,
                }
            )
        out.append(
            {"id": n, "data": task["data"], "annotations": annotations, "drafts": [], "predictions": [n]}
        )
    return out


def choice(label: str) -> list[dict]:
    return [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}]


def write(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload))
    return path


def test_import_round_trip_makes_a_persons_label_final(sentiment_run, tmp_path):
    tasks = json.loads(export_run(sentiment_run, "label-studio", only_noisy=True).path.read_text())
    # the reviewer labels c (no answer), fixes b, accepts f's prediction as it is, and skips nothing
    accepted = tasks[2]["predictions"][0]["result"]
    export = reviewed(tasks, {"c": choice("negative"), "b": choice("negative"), "f": accepted})
    sdk = pytest.importorskip("label_studio_sdk.label_interface")
    interface = sdk.LabelInterface(label_studio_config(Task(**SENTIMENT)))
    assert all(interface.validate_annotation(a) for t in export for a in t["annotations"])

    done = import_corrections(sentiment_run, write(tmp_path / "ls.json", export))
    assert (done.corrections, done.changed, done.skipped, done.total) == (3, 2, 0, 3)
    rows = {r["id"]: r for r in read_jsonl(sentiment_run / "labels.jsonl")}
    for item, label in (("c", "negative"), ("b", "negative"), ("f", "positive")):
        assert rows[item]["label"] == label and rows[item]["confidence"] == 1.0
        assert rows[item]["source"] == "human" and rows[item]["clean"] is True
    assert rows["a"]["source"] == "freeal" and rows["a"]["label"] == "positive"
    kept = read_jsonl(sentiment_run / HUMAN_LABELS)
    assert [r["id"] for r in kept] == ["b", "c", "f"]  # the run's order
    assert kept[0]["annotated_at"] == "2024-05-01T10:00:00.000000Z" and kept[0]["annotator"] == 1

    # a later review of a wider export: b changes again (the later import wins), c and f stay
    tasks = json.loads(export_run(sentiment_run, "label-studio").path.read_text())
    later = reviewed(tasks, {"b": choice("positive"), "d": None}, stamp="11:00")
    done = import_corrections(sentiment_run, write(tmp_path / "ls2.json", later))
    assert (done.corrections, done.skipped, done.total) == (1, 5, 3)
    rows = {r["id"]: r for r in read_jsonl(sentiment_run / "labels.jsonl")}
    assert rows["b"]["label"] == "positive" and rows["c"]["label"] == "negative"
    assert rows["d"]["source"] == "freeal"  # skipped (cancelled): not a person's label
    # a person's label is never in doubt again
    again = json.loads(export_run(sentiment_run, "label-studio", only_noisy=True).path.read_text())
    assert [t["data"]["freeal_id"] for t in again] == []


def test_the_latest_submitted_annotation_wins(sentiment_run, tmp_path):
    tasks = json.loads(export_run(sentiment_run, "label-studio", limit=1).path.read_text())
    export = reviewed(tasks, {"c": choice("positive")}, stamp="09:00")
    first = export[0]["annotations"][0]
    export[0]["annotations"] = [
        {**first, "id": 7, "result": choice("negative"), "updated_at": "2024-05-02T08:00:00Z"},
        first,
        {
            **first,
            "id": 8,
            "result": choice("positive"),
            "was_cancelled": True,
            "updated_at": "2024-06-01T00:00:00Z",
        },
    ]
    import_corrections(sentiment_run, write(tmp_path / "ls.json", export))
    assert {r["id"]: r["label"] for r in read_jsonl(sentiment_run / "labels.jsonl")}["c"] == "negative"


def test_ner_import_maps_characters_back_to_tokens(ner_run, tmp_path):
    tasks = json.loads(export_run(ner_run, "label-studio").path.read_text())
    text = tasks[1]["data"]["text"]  # s2: "Lithium - induced tremor was seen ."
    assert tasks[1]["data"]["freeal_id"] == "s2"

    def span(start: int, end: int, kind: str) -> dict:
        value = {"start": start, "end": end, "text": text[start:end], "labels": [kind]}
        return {"from_name": "label", "to_name": "text", "type": "labels", "value": value}

    tremor = text.index("tremor")
    # the reviewer keeps Lithium, adds "tremor" (selected without its last letter: the whole word counts)
    answer = [span(0, 7, "Chemical"), span(tremor, tremor + 5, "Disease")]
    done = import_corrections(ner_run, write(tmp_path / "ls.json", reviewed(tasks, {"s2": answer})))
    assert (done.corrections, done.changed) == (1, 1)
    row = {r["id"]: r for r in read_jsonl(ner_run / "labels.jsonl")}["s2"]
    assert row["tags"] == ["B-Chemical", "O", "O", "B-Disease", "O", "O", "O"]
    assert [e["text"] for e in row["entities"]] == ["Lithium", "tremor"]
    assert row["source"] == "human" and row["clean"] is True and row["agreement"] == 6 / 7
    assert read_jsonl(ner_run / HUMAN_LABELS)[0]["spans"] == [["Chemical", 0, 1], ["Disease", 3, 4]]
    with pytest.raises(FreeALError, match="overlap"):
        overlapping = [span(0, 7, "Chemical"), span(0, 9, "Disease")]
        import_corrections(ner_run, write(tmp_path / "bad.json", reviewed(tasks, {"s2": overlapping})))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"tasks": []}, "not a Label Studio JSON export"),
        ("freeal-tasks", "this is the file freeal exported"),
        ("unknown-id", r"1 task\(s\) name no item of this run \(data.freeal_id 'zz'\)"),
        ("bad-label", "label 'neutral' is not one of the task's labels \\(negative, positive\\)"),
        ("two-labels", "chooses 2 labels; one is needed"),
        ("other-text", "its text differs from the run's"),
    ],
)
def test_bad_imports_are_one_clear_error(payload, message, sentiment_run, tmp_path):
    tasks = json.loads(export_run(sentiment_run, "label-studio", limit=1).path.read_text())
    good = reviewed(tasks, {"c": choice("negative")})
    if payload == "freeal-tasks":
        payload = tasks
    elif payload == "unknown-id":
        payload = [*good, {**good[0], "data": {**good[0]["data"], "freeal_id": "zz"}}]
    elif payload == "bad-label":
        payload = reviewed(tasks, {"c": choice("neutral")})
    elif payload == "two-labels":
        payload = reviewed(tasks, {"c": [*choice("negative"), *choice("positive")]})
    elif payload == "other-text":
        payload = [{**good[0], "data": {**good[0]["data"], "text": "another text"}}]
    before = (sentiment_run / "labels.jsonl").read_text()
    with pytest.raises(FreeALError, match=message):
        import_corrections(sentiment_run, write(tmp_path / "in.json", payload))
    assert (sentiment_run / "labels.jsonl").read_text() == before  # nothing half-imported
    assert not (sentiment_run / HUMAN_LABELS).exists()


def test_export_and_import_from_the_command_line(sentiment_run, tmp_path):
    runner = CliRunner()
    out = tmp_path / "review.json"
    done = runner.invoke(
        app, ["export", str(sentiment_run), "--to", "label-studio", "--limit", "2", "--out", str(out)]
    )
    assert done.exit_code == 0, done.output
    assert "wrote 2 items" in done.output and "review-config.xml" in done.output
    export = write(tmp_path / "ls.json", reviewed(json.loads(out.read_text()), {"b": choice("negative")}))
    done = runner.invoke(app, ["import", str(sentiment_run), "--from", "label-studio", str(export)])
    assert done.exit_code == 0, done.output
    assert "imported 1 labels" in done.output
    assert {r["id"]: r["label"] for r in read_jsonl(sentiment_run / "labels.jsonl")}["b"] == "negative"
    done = runner.invoke(app, ["import", str(sentiment_run), "--from", "argilla", str(export)])
    assert isinstance(done.exception, FreeALError) and "only label-studio" in str(done.exception)


# -- the loop after an import ------------------------------------------------------------------------


FIRST_WORD = {"who": "human", "where": "location", "when": "number", "how": "number", "what": "entity"}


def test_a_resumed_run_never_asks_again_what_a_person_labelled(data_dir, tmp_path, monkeypatch, scripted_llm):
    pytest.importorskip("torch")
    from freeal.config import LLMConfig, LoopConfig, SLMConfig
    from freeal.data import read_items
    from freeal.embed import Embedder
    from freeal.llm.cache import CachedAnnotator, CallCache
    from freeal.loop import FreeAL
    from freeal.tasks import load_task

    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path / "cache"))
    task = load_task(data_dir / "trec")
    items = read_items(data_dir / "trec" / "train.jsonl", task=task, limit=24, seed=1)
    embedder = Embedder(device="cpu", cache=False)

    def keywords():  # type: ignore[no-untyped-def]
        """A fake LLM for TREC questions: a label from the question's first word."""
        return scripted_llm(lambda text, labels: FIRST_WORD.get(text.split()[0].lower(), "description"))

    def loop(fake, **kw) -> FreeAL:  # type: ignore[no-untyped-def]
        return FreeAL(
            task,
            LLMConfig(calibrate="off"),
            SLMConfig(
                mode="head", backbone="all-minilm-l6-v2", epochs=4, warmup_epochs=1, cross_fit=0, device="cpu"
            ),
            LoopConfig(
                refinery_rounds=2,
                refine="disagree",
                min_change=0,
                k=4,
                group_size=12,
                min_kappa=-1.0,
                pool_size=6,
            ),
            run_dir=tmp_path / "run",
            annotator=CachedAnnotator(fake, CallCache(tmp_path / "llm.sqlite")),
            embedder=embedder,
            progress=False,
            **kw,
        )

    def stop_before_refinery(message: str) -> None:
        if message.startswith("step round-1/llm"):
            raise KeyboardInterrupt("stopped before refinery")

    # refine: disagree, so that without the fix a person's rare label, which the SLM does not
    # reproduce, would be doubted and asked again
    with pytest.raises(KeyboardInterrupt):
        loop(keywords(), say=stop_before_refinery).fit(items)
    noisy = [r["id"] for r in read_jsonl(tmp_path / "run" / "round-0/feedback/noisy.jsonl")]
    assert len(noisy) >= 3, "the slice must leave items for refinery to ask"
    # a person labels two of the items refinery was about to ask (from a review of another export)
    text = dict(zip(items.ids, items.texts, strict=True))
    people = {noisy[0]: "abbreviation", noisy[1]: "location"}
    tasks = [{"data": {"text": text[i], "freeal_id": i}} for i in people]
    export = reviewed(tasks, {i: choice(label) for i, label in people.items()})
    import_corrections(tmp_path / "run", write(tmp_path / "ls.json", export))

    fake = keywords()
    frame = loop(fake).fit(items)
    asked_again = [i for i in noisy if i not in people]  # round 1: the others only
    assert sorted(fake.asked[: len(asked_again)]) == sorted(text[i] for i in asked_again)
    assert not {text[i] for i in people} & set(fake.asked)  # nor in round 2
    # feedback after the import counts them clean, not noisy
    assert not set(people) & {r["id"] for r in read_jsonl(tmp_path / "run" / "round-1/feedback/noisy.jsonl")}
    labels = {r["id"]: r for r in read_jsonl(tmp_path / "run" / "labels.jsonl")}
    for item, label in people.items():
        assert labels[item]["label"] == label and labels[item]["source"] == "human"
        assert labels[item]["confidence"] == 1.0 and labels[item]["clean"] is True
    assert frame.set_index("id").loc[noisy[0], "label"] == "abbreviation"

    finished = keywords()  # resuming a finished run asks nothing and keeps the person's labels
    loop(finished).fit(items)
    assert finished.asked == []
    assert {r["id"]: r["label"] for r in read_jsonl(tmp_path / "run" / "labels.jsonl")}[
        noisy[1]
    ] == "location"

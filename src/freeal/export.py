"""A person at the end of the loop: export a run's labels for audit, import the corrections.

FreeAL labels with no human in the loop; this module lets one check its work afterwards.
:func:`export_run` writes a finished run's final labels (``labels.jsonl``), the most doubtful
first, in a tool's own import format:

- ``label-studio``: a JSON list of Label Studio tasks, freeal's answer as each task's prediction
  (a pre-annotation the reviewer accepts or fixes), plus the labeling config (XML) that creates a
  matching project;
- ``argilla``: a folder in the layout of Argilla v2's ``Dataset.to_disk`` (``.argilla/settings.json``,
  ``.argilla/dataset.json``, ``records.json``), freeal's answer as each record's suggestion; upload
  it with ``rg.Dataset.from_disk(folder, client=client)``;
- ``datasets``: a Hugging Face dataset (``save_to_disk``), the labels as ``ClassLabel`` features,
  to train on or push to the Hub (needs ``freeal[hub]``);
- ``csv``: one row per item (lists and mappings as JSON).

**Doubt order.** Items go out lowest *confidence* first, the score each format carries along:
the final label's confidence (``labels.jsonl``; for NER how clear the vote on the sentence's least
clear entity was). Where a NER run kept the LLM's lists as they are (``final_label: llm``) and so
has none, a sentence scores the share of its tokens on which the final tags and the SLM tagger's
tags agree (the ``agreement`` column): a sentence the tagger trained on the labels cannot
reproduce is the likeliest to hold a mistake. An item without an answer scores 0, one a person
labelled scores 1. Ties: items the SLM flagged noisy first, then the run's order.

:func:`import_corrections` reads Label Studio's JSON export of the reviewed project back: per task
the latest annotation that was not cancelled is a person's answer. The answers go to
``human/labels.jsonl`` in the run folder (merged with earlier imports, the later one winning) and
into ``labels.jsonl`` (:func:`apply_corrections`: confidence 1, clean, ``source: human``). The loop
reads the same file (:func:`read_corrections`), so a person's answer is fixed for any step that
runs afterwards: never asked again, learnt by the SLM, kept in the final labels.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import pandas as pd
from filelock import FileLock, Timeout

from freeal.config import run_key
from freeal.data import read_jsonl, write_jsonl_atomic, write_text_atomic
from freeal.errors import FreeALError
from freeal.extras import require
from freeal.kinds import kind_of
from freeal.ner import render, tag_names
from freeal.tasks import Task, task_from_dict

#: The formats :func:`export_run` writes.
FORMATS = ("label-studio", "argilla", "datasets", "csv")

#: Where a run folder keeps the answers people gave (one row per item, the answer as the loop keeps it).
HUMAN_LABELS = Path("human") / "labels.jsonl"

#: The name of the labeling question in both tools, so an import finds the answer.
QUESTION = "label"

#: The export's default path under ``RUN/export/``, per format.
_DEFAULT_OUT = {
    "label-studio": "label-studio.json",
    "argilla": "argilla",
    "datasets": "datasets",
    "csv": "labels.csv",
}

#: A file every previous export of a folder format holds: only such a folder is replaced.
_FOLDER_MARK = {"argilla": Path(".argilla") / "settings.json", "datasets": Path("state.json")}


@dataclass
class Exported:
    """What :func:`export_run` wrote: the export, how many items, and Label Studio's labeling config."""

    path: Path
    items: int
    config: Path | None = None


@dataclass
class Imported:
    """What :func:`import_corrections` did: ``corrections`` answers read from the file (``changed``
    of them differ from the run's label), ``skipped`` tasks with no submitted annotation, and
    ``total`` answers kept in ``path`` after merging with earlier imports."""

    path: Path
    corrections: int
    changed: int
    skipped: int
    total: int


# -- reading a run folder --------------------------------------------------------------------------


def _run_spec(folder: Path) -> dict:
    marker = folder / "run.json"
    if not marker.is_file():
        raise FreeALError(f"{folder}: not a freeal run folder (no run.json)")
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FreeALError(f"{marker}: cannot read the run's settings ({exc})") from exc


def _task(folder: Path, spec: dict) -> Task:
    return task_from_dict(spec.get("task") or {}, source=str(folder / "run.json"))


def _model_version(spec: dict) -> str:
    """``freeal-<key>``: the run's fingerprint key (the hash that names a default run folder), so
    predictions from two runs never share a version in the labeling tool."""
    return "freeal-" + run_key(spec)


def _final_rows(folder: Path) -> list[dict]:
    labels = folder / "labels.jsonl"
    if not labels.is_file():
        raise FreeALError(f"{folder}: the run has not finished (no labels.jsonl); run it to the end first")
    return read_jsonl(labels)


# -- doubt order -----------------------------------------------------------------------------------


def doubt_score(task: Task, row: dict) -> float:
    """How far a final label can be trusted, in [0, 1] (see the module docstring): its confidence
    (for NER, where the final rule gave none, the tagger's token agreement); 1 for a person's
    answer, 0 without one."""
    if row.get("source") == "human":
        return 1.0
    value = row.get("confidence")
    if task.kind == "ner" and value is None:
        value = row.get("agreement")
    if value is None or value != value:  # no answer (None, or NaN from a frame)
        return 0.0
    return float(value)


def ranked(
    task: Task, rows: Sequence[dict], *, only_noisy: bool = False, limit: int | None = None
) -> list[tuple[dict, float]]:
    """``rows`` with their :func:`doubt_score`, most doubtful first; ``only_noisy`` keeps the items
    the SLM flagged noisy (``clean: false``), ``limit`` the first that many."""
    if limit is not None and limit < 1:
        raise FreeALError(f"limit must be 1 or more, got {limit}")
    scored = [(row, doubt_score(task, row)) for row in rows if not (only_noisy and row.get("clean"))]
    scored.sort(key=lambda pair: (pair[1], bool(pair[0].get("clean"))))  # stable: then the run's order
    return scored[:limit]


def token_offsets(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Each token's ``[start, end)`` characters in the sentence as exported (tokens joined by one space)."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append((at, at + len(token)))
        at += len(token) + 1
    return offsets


def _char_entities(row: dict) -> list[tuple[str, int, int]]:
    """A NER row's entities as ``(type, start, end)`` character offsets into ``render(tokens)``."""
    offsets = token_offsets(row["tokens"])
    return [(e["type"], offsets[e["start"]][0], offsets[e["end"] - 1][1]) for e in row.get("entities") or []]


def _text(task: Task, row: dict) -> str:
    return render(row["tokens"]) if task.kind == "ner" else row["text"]


# -- export ----------------------------------------------------------------------------------------


def export_run(
    run_dir: str | Path,
    to: str,
    *,
    only_noisy: bool = False,
    limit: int | None = None,
    out: str | Path | None = None,
) -> Exported:
    """Write a finished run's final labels for review in format ``to`` (one of :data:`FORMATS`),
    most doubtful first. ``out``: the file (``label-studio``, ``csv``) or folder (``argilla``,
    ``datasets``) to write; default ``RUN/export/`` + ``label-studio.json`` (its config beside it as
    ``label-studio-config.xml``), ``argilla/``, ``datasets/`` or ``labels.csv``. A folder is
    replaced only when it holds an earlier export of the same format."""
    if to not in FORMATS:
        raise FreeALError(f"unknown export format {to!r}; choose one of {', '.join(FORMATS)}")
    folder = Path(run_dir)
    spec = _run_spec(folder)
    task = _task(folder, spec)
    chosen = ranked(task, _final_rows(folder), only_noisy=only_noisy, limit=limit)
    target = Path(out) if out is not None else folder / "export" / _DEFAULT_OUT[to]
    if to == "label-studio":
        version = _model_version(spec)
        write_text_atomic(
            target,
            json.dumps([_label_studio_task(task, row, s, version) for row, s in chosen], ensure_ascii=False),
        )
        config = write_text_atomic(target.with_name(f"{target.stem}-config.xml"), label_studio_config(task))
        return Exported(target, len(chosen), config)
    if to == "argilla":
        _write_argilla(task, chosen, _model_version(spec), target)
    elif to == "datasets":
        _write_datasets(task, chosen, target)
    else:
        _write_csv(task, chosen, target)
    return Exported(target, len(chosen))


def label_studio_config(task: Task) -> str:
    """The labeling config of a Label Studio project for ``task``: the text, and a single choice
    (classification) or span labels snapping to whole words (NER) named :data:`QUESTION`."""
    if task.kind == "ner":
        text = '<Text name="text" value="$text" granularity="word"/>'
        options = "".join(f"    <Label value={quoteattr(name)}/>\n" for name in task.label_names)
        control = f'  <Labels name="{QUESTION}" toName="text">\n{options}  </Labels>\n'
    else:
        text = '<Text name="text" value="$text"/>'
        options = "".join(
            f"    <Choice value={quoteattr(name)} hint={quoteattr(hint)}/>\n"
            for name, hint in task.labels.items()
        )
        control = (
            f'  <Choices name="{QUESTION}" toName="text" choice="single-radio">\n{options}  </Choices>\n'
        )
    return f"<View>\n  <Header value={quoteattr(task.description)}/>\n  {text}\n{control}</View>\n"


def _label_studio_task(task: Task, row: dict, score: float, version: str) -> dict:
    """One task: the text and freeal's item id as data, freeal's answer as the prediction."""
    text = _text(task, row)
    if task.kind == "ner":
        result = [
            {
                "from_name": QUESTION,
                "to_name": "text",
                "type": "labels",
                "value": {"start": start, "end": end, "text": text[start:end], "labels": [kind]},
            }
            for kind, start, end in _char_entities(row)
        ]
    else:
        result = (
            []
            if row.get("label") is None
            else [
                {
                    "from_name": QUESTION,
                    "to_name": "text",
                    "type": "choices",
                    "value": {"choices": [row["label"]]},
                }
            ]
        )
    return {
        "data": {"text": text, "freeal_id": row["id"]},
        "predictions": [{"model_version": version, "score": score, "result": result}],
    }


def argilla_settings(task: Task) -> dict:
    """Argilla v2 dataset settings (the JSON of ``rg.Settings.serialize``) for ``task``: the text
    field, a label (classification) or span (NER, character offsets) question named :data:`QUESTION`,
    and metadata to sort and filter by (freeal's confidence, its doubt rank, clean or noisy)."""
    options = [{"value": name, "text": name} for name in task.label_names]
    if task.kind == "ner":
        settings: dict = {"type": "span", "field": "text", "allow_overlapping": False}
    else:
        settings = {"type": "label_selection"}
    guidelines = f"{task.description}\n\n" + "\n".join(f"- **{n}**: {d}" for n, d in task.labels.items())
    guidelines += (
        "\n\nfreeal's answer is suggested; records are ranked most doubtful first (metadata freeal_rank)."
    )
    return {
        "guidelines": guidelines,
        "questions": [
            {
                "name": QUESTION,
                "title": "entities" if task.kind == "ner" else "label",
                "description": None,
                "required": task.kind != "ner",  # a sentence may hold no entity
                "settings": {**settings, "options": options, "visible_options": None},
            }
        ],
        "fields": [
            {
                "name": "text",
                "title": "text",
                "required": True,
                "description": None,
                "settings": {"type": "text", "use_markdown": False},
            }
        ],
        "vectors": [],
        "metadata": [
            _argilla_metadata("freeal_confidence", {"type": "float", "min": 0.0, "max": 1.0}),
            _argilla_metadata("freeal_rank", {"type": "integer", "min": None, "max": None}),
            _argilla_metadata("freeal_clean", {"type": "terms", "values": ["clean", "noisy"]}),
        ],
        "allow_extra_metadata": False,
        "distribution": {"strategy": "overlap", "min_submitted": 1},
        "mapping": None,
    }


def _argilla_metadata(name: str, settings: dict) -> dict:
    return {
        "name": name,
        "title": name.replace("_", " "),
        "visible_for_annotators": True,
        "settings": {**settings, "visible_for_annotators": True},
    }


def _argilla_record(task: Task, row: dict, score: float, rank: int, version: str) -> dict:
    """One record as ``rg.Record.to_dict`` writes it (what ``rg.Record.from_dict`` reads). A
    sentence without entities, or an item without an answer, gets no suggestion."""
    if task.kind == "ner":
        value: Any = [{"label": k, "start": s, "end": e} for k, s, e in _char_entities(row)] or None
    else:
        value = row.get("label")
    return {
        "id": str(row["id"]),
        "fields": {"text": _text(task, row)},
        "metadata": {
            "freeal_confidence": score,
            "freeal_rank": rank,
            "freeal_clean": "clean" if row.get("clean") else "noisy",
        },
        "suggestions": {}
        if value is None
        else {QUESTION: {"value": value, "score": score, "agent": version}},
        "responses": {},
        "vectors": {},
        "status": "pending",
        "_server_id": None,
    }


def _write_argilla(task: Task, chosen: list[tuple[dict, float]], version: str, target: Path) -> None:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{task.name}-{version}")
    settings = argilla_settings(task)
    dataset = {"name": name, "guidelines": settings["guidelines"], "allow_extra_metadata": False}
    records = [_argilla_record(task, row, s, rank, version) for rank, (row, s) in enumerate(chosen, 1)]

    def write(folder: Path) -> None:
        write_text_atomic(folder / ".argilla" / "settings.json", json.dumps(settings, ensure_ascii=False))
        write_text_atomic(folder / ".argilla" / "dataset.json", json.dumps(dataset, ensure_ascii=False))
        write_text_atomic(folder / "records.json", json.dumps(records, ensure_ascii=False))

    _replace_folder(target, "argilla", write)


def _write_datasets(task: Task, chosen: list[tuple[dict, float]], target: Path) -> None:
    require("datasets", what="`freeal export --to datasets`")
    import datasets

    rows = [row for row, _ in chosen]
    columns: dict[str, list[Any]] = {"id": [str(row["id"]) for row in rows]}
    features: dict[str, Any] = {"id": datasets.Value("string")}
    if task.kind == "ner":
        columns |= {"tokens": [row["tokens"] for row in rows], "ner_tags": [row["tags"] for row in rows]}
        features |= {
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=tag_names(task.label_names))),
        }
    else:
        columns |= {"text": [row["text"] for row in rows], "label": [row.get("label") for row in rows]}
        features |= {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=task.label_names)}
    columns |= {"confidence": [s for _, s in chosen], "clean": [bool(row.get("clean")) for row in rows]}
    features |= {"confidence": datasets.Value("float64"), "clean": datasets.Value("bool")}
    if any("source" in row for row in rows):
        columns["source"] = [row.get("source", "freeal") for row in rows]
        features["source"] = datasets.Value("string")
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    _replace_folder(target, "datasets", lambda folder: dataset.save_to_disk(str(folder)))


def _write_csv(task: Task, chosen: list[tuple[dict, float]], target: Path) -> None:
    """``id, text, confidence`` (the doubt score), then the row's other columns; lists and mappings
    (NER tokens, tags, entities) as JSON."""
    records = [
        {
            "id": row["id"],
            "text": _text(task, row),
            "confidence": score,
            **{
                k: json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else v
                for k, v in row.items()
                if k not in ("id", "text", "confidence")
            },
        }
        for row, score in chosen
    ]
    frame = pd.DataFrame(records) if records else pd.DataFrame(columns=["id", "text", "confidence"])
    write_text_atomic(target, frame.to_csv(index=False))


def _replace_folder(target: Path, to: str, write: Any) -> None:
    """Write a folder export next to ``target``, then put it in place: a killed export leaves the
    old one whole, and a folder that is not an earlier export of this format is never deleted."""
    if target.exists() and (
        not target.is_dir() or (any(target.iterdir()) and not (target / _FOLDER_MARK[to]).is_file())
    ):
        raise FreeALError(f"{target} exists and is not an earlier {to} export; choose another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        write(fresh)
        if target.exists():
            shutil.rmtree(target)
        fresh.replace(target)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise


# -- import ----------------------------------------------------------------------------------------


def read_corrections(run_dir: str | Path) -> dict[str, dict]:
    """The answers people gave in a run folder (:data:`HUMAN_LABELS`), by item id; empty without any."""
    path = Path(run_dir) / HUMAN_LABELS
    return {row["id"]: row for row in read_jsonl(path)} if path.is_file() else {}


def apply_corrections(task: Task, rows: Sequence[dict], corrections: dict[str, dict]) -> list[dict]:
    """Final label rows (``labels.jsonl``) with a person's answer where there is one (the task
    kind's :meth:`~freeal.kinds.base.TaskKind.corrected` row, ``source: human``); every other row
    ``source: freeal``. Without corrections the rows are returned as they are (no ``source`` column)."""
    if not corrections:
        return list(rows)
    kind = kind_of(task)
    out = []
    for row in rows:
        fix = corrections.get(row["id"])
        if fix is None:
            out.append({**row, "source": "freeal"})
        else:
            out.append({**kind.corrected(row, fix), "source": "human"})
    return out


def import_corrections(run_dir: str | Path, file: str | Path) -> Imported:
    """Read Label Studio's JSON export of a project made from :func:`export_run` and keep each
    task's latest annotation that was not cancelled as a person's answer (see the module
    docstring). A span that cuts a word takes the whole word. Unknown items, labels outside the
    task, texts that differ from the run's, or a file that is no such export: one FreeALError."""
    folder, path = Path(run_dir), Path(file)
    spec = _run_spec(folder)
    task = _task(folder, spec)
    items = {row["id"]: row for row in read_jsonl(folder / "items.jsonl")}
    answers, skipped = _read_label_studio(path, task, items)
    lock = FileLock(folder / ".lock")  # the lock FreeAL.fit holds on its run folder
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise FreeALError(f"{folder} is in use by a freeal run; import once it has finished") from None
    try:
        labels = folder / "labels.jsonl"
        rows = read_jsonl(labels) if labels.is_file() else []
        key = "spans" if task.kind == "ner" else "label"
        before = {row["id"]: _row_answer(task, row) for row in rows}
        changed = sum(a[key] != before[i] for i, a in answers.items() if i in before)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        corrections = read_corrections(folder)
        for item_id, answer in answers.items():
            corrections[item_id] = {"id": item_id, **answer, "file": str(path), "imported_at": stamp}
        kept = [corrections[i] for i in items if i in corrections]  # in the run's order
        write_jsonl_atomic(folder / HUMAN_LABELS, kept)
        if rows:
            write_jsonl_atomic(labels, apply_corrections(task, rows, corrections))
    finally:
        lock.release()
    return Imported(folder / HUMAN_LABELS, len(answers), changed, skipped, len(kept))


def _row_answer(task: Task, row: dict) -> Any:
    """A final row's answer as the loop keeps it (a label, or ``[type, start, end]`` token spans)."""
    if task.kind != "ner":
        return row.get("label")
    entities = row.get("entities")
    return None if entities is None else [[e["type"], e["start"], e["end"]] for e in entities]


def _read_label_studio(path: Path, task: Task, items: dict[str, dict]) -> tuple[dict[str, dict], int]:
    """Each reviewed item's answer (``label`` or ``spans``, with who gave it and when) from a Label
    Studio export, and how many tasks had no submitted annotation. An item in several tasks (a
    project imported twice) takes the latest annotation of all."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FreeALError(f"{path}: cannot read it as a Label Studio JSON export ({exc})") from exc
    shape = (
        "a Label Studio JSON export (a list of tasks with data and annotations; Export > JSON in the project)"
    )
    if not isinstance(raw, list) or not all(
        isinstance(t, dict)
        and isinstance(t.get("data"), dict)
        and isinstance(t.get("annotations", []), list)
        and all(isinstance(a, dict) for a in t.get("annotations", []))
        for t in raw
    ):
        raise FreeALError(f"{path}: not {shape}")
    if raw and not any("annotations" in t for t in raw):
        raise FreeALError(f"{path}: no task has annotations: this is the file freeal exported, not {shape}")
    unknown = [t["data"].get("freeal_id") for t in raw if t["data"].get("freeal_id") not in items]
    if unknown:
        shown = ", ".join(map(repr, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise FreeALError(
            f"{path}: {len(unknown)} task(s) name no item of this run (data.freeal_id {shown}); "
            "was the project made from another run's export?"
        )
    latest: dict[str, tuple[str, dict, dict]] = {}
    skipped = 0
    for t in raw:
        submitted = [
            (str(a.get("updated_at") or a.get("created_at") or ""), n, a)
            for n, a in enumerate(t.get("annotations", []))
            if not a.get("was_cancelled")
        ]
        if not submitted:
            skipped += 1
            continue
        stamp, _, annotation = max(submitted, key=lambda s: s[:2])
        item_id = t["data"]["freeal_id"]
        if item_id not in latest or stamp >= latest[item_id][0]:
            latest[item_id] = (stamp, t, annotation)
    answers = {}
    for item_id, (stamp, t, annotation) in latest.items():
        where = f"{path}: task {t.get('id', '?')} (freeal_id {item_id!r})"
        item = items[item_id]
        if t["data"].get("text") != _text(task, item):
            raise FreeALError(
                f"{where}: its text differs from the run's; was the project made from another run?"
            )
        regions = [
            r
            for r in annotation.get("result") or []
            if isinstance(r, dict) and r.get("from_name") == QUESTION
        ]
        answer = (
            _spans(task, item["tokens"], regions, where)
            if task.kind == "ner"
            else _label(task, regions, where)
        )
        answers[item_id] = {
            **answer,
            "annotated_at": stamp or None,
            "annotator": annotation.get("completed_by"),
        }
    return answers, skipped


def _label(task: Task, regions: list[dict], where: str) -> dict:
    """The one label a classification annotation chooses."""
    chosen = [
        c for r in regions if r.get("type") == "choices" for c in (r.get("value") or {}).get("choices", [])
    ]
    if len(chosen) != 1:
        raise FreeALError(f"{where}: the annotation chooses {len(chosen)} labels; one is needed")
    if chosen[0] not in task.labels:
        raise FreeALError(
            f"{where}: label {chosen[0]!r} is not one of the task's labels ({', '.join(task.label_names)})"
        )
    return {"label": chosen[0]}


def _spans(task: Task, tokens: list[str], regions: list[dict], where: str) -> dict:
    """A NER annotation's entities as token spans: each covers the tokens its characters touch."""
    offsets = token_offsets(tokens)
    spans = []
    for region in regions:
        if region.get("type") != "labels":
            continue
        value = region.get("value") or {}
        kinds, start, end = value.get("labels") or [], value.get("start"), value.get("end")
        if len(kinds) != 1 or kinds[0] not in task.labels:
            raise FreeALError(
                f"{where}: entity labels {kinds!r}: one of the task's types "
                f"({', '.join(task.label_names)}) is needed"
            )
        if not isinstance(start, int) or not isinstance(end, int):
            raise FreeALError(f"{where}: an entity has no character offsets (start, end)")
        covered = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
        if not covered:
            raise FreeALError(f"{where}: the entity at characters {start}-{end} covers no word")
        spans.append([kinds[0], covered[0], covered[-1] + 1])
    spans.sort(key=lambda span: span[1])
    for first, second in pairwise(spans):
        if first[2] > second[1]:
            raise FreeALError(
                f"{where}: entities {first[0]} and {second[0]} overlap; IOB2 tags cannot hold both"
            )
    return {"spans": spans}

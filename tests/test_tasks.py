"""Tests for freeal.tasks: task files (the real task.json files, YAML, and bad ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freeal.errors import FreeALError
from freeal.tasks import load_task, task_from_dict

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

REAL = {
    "sst2": ("classification", ["negative", "positive"]),
    "mr": ("classification", ["negative", "positive"]),
    "trec": ("classification", ["description", "entity", "abbreviation", "human", "number", "location"]),
    "bc5cdr": ("ner", ["Chemical", "Disease"]),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_task_files(name):
    path = DATA / name / "task.json"
    if not path.exists():
        pytest.skip(f"{path} is not available")
    task = load_task(path)
    kind, labels = REAL[name]
    assert task.name == name
    assert task.kind == kind
    assert task.label_names == labels
    assert task.description.strip()
    assert all(d.strip() for d in task.labels.values())
    if kind == "ner":
        assert task.scheme == "IOB2"
    assert load_task(path.parent) == task  # a data folder means its task.json


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_yaml_task_file(tmp_path, suffix):
    path = tmp_path / f"task{suffix}"
    path.write_text(
        "name: topic\ndescription: Topic of a news headline.\nlabels:\n"
        "  sports: about sport\n  politics: about politics\n",
        encoding="utf-8",
    )
    task = load_task(path)
    assert task.kind == "classification"
    assert task.label_names == ["sports", "politics"]


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_empty_labels(tmp_path):
    path = write_json(tmp_path / "task.json", {"name": "t", "description": "d", "labels": {}})
    with pytest.raises(FreeALError, match=r"task\.json: labels: .*the label set is empty"):
        load_task(path)


def test_missing_description(tmp_path):
    path = write_json(tmp_path / "task.json", {"name": "t", "labels": {"a": "b"}})
    with pytest.raises(FreeALError, match=r"task\.json: description: Field required"):
        load_task(path)


def test_invalid_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "t",', encoding="utf-8")
    with pytest.raises(FreeALError, match=r"broken\.json: not valid JSON"):
        load_task(path)


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [t\nlabels: {a: b\n", encoding="utf-8")
    with pytest.raises(FreeALError, match=r"broken\.yaml: not valid YAML"):
        load_task(path)


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(FreeALError, match=r"list\.yaml: a task file must hold a mapping"):
        load_task(path)


def test_missing_file(tmp_path):
    with pytest.raises(FreeALError, match=r"nope\.json: cannot read the task file"):
        load_task(tmp_path / "nope.json")


def test_folder_without_task_json(tmp_path):
    with pytest.raises(FreeALError, match=r"task\.json: cannot read the task file"):
        load_task(tmp_path)


def test_task_from_dict_names_the_source():
    with pytest.raises(FreeALError, match=r"inline: kind: "):
        task_from_dict(
            {"name": "t", "description": "d", "labels": {"a": "b"}, "kind": "regression"}, "inline"
        )

"""Tests for freeal.data: readers of user data and the atomic JSONL writer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freeal.data import Items, read_items, read_jsonl, write_jsonl_atomic
from freeal.errors import FreeALError
from freeal.tasks import Task, load_task

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TASK = Task(
    name="sentiment",
    description="Sentiment of a text.",
    labels={"negative": "a negative opinion", "positive": "a positive opinion"},
)


def real(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list[object]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --- real data ---------------------------------------------------------------------------------


def test_sst2_test_split():
    path = real("sst2", "test.jsonl")
    items = read_items(path, task=load_task(real("sst2", "task.json")))
    assert len(items) == 1821
    assert items.ids[:3] == ["0", "1", "2"] and items.ids[-1] == "1820"
    assert items.gold is not None and set(items.gold) == {"negative", "positive"}
    assert items.source == str(path)
    assert items.extra == {}
    assert all(isinstance(t, str) and t.strip() for t in items.texts)


def test_limit_is_a_fixed_slice_in_original_order():
    path = real("sst2", "test.jsonl")
    full = read_items(path)
    a = read_items(path, limit=50, seed=0)
    b = read_items(path, limit=50, seed=0)
    assert len(a) == 50 and a.ids == b.ids and a.texts == b.texts
    pos = [int(i) for i in a.ids]
    assert pos == sorted(pos) and len(set(pos)) == 50
    assert a.texts == [full.texts[i] for i in pos]
    assert a.gold == [full.gold[i] for i in pos]  # type: ignore[index]
    assert read_items(path, limit=50, seed=1).ids != a.ids


def test_mr_llm_labels_with_nulls_and_backtranslation():
    path = real("mr", "train_llm_gpt35.jsonl")
    items = read_items(
        path, label_col="llm_label", keep=("backtranslation",), task=load_task(real("mr", "task.json"))
    )
    assert len(items) == 8662
    assert items.gold is not None
    assert set(items.gold) == {"negative", "positive", None}
    assert 300 < items.gold.count(None) < 500  # 4.4% unparseable answers
    assert len(items.extra["backtranslation"]) == 8662
    assert isinstance(items.extra["backtranslation"][0], str)
    # the plain reader sees no "label" column there: no gold at all
    assert read_items(path).gold is None


# --- formats -----------------------------------------------------------------------------------


def test_csv_with_id_column_keeps_na_as_text(tmp_path):
    path = write(tmp_path / "d.csv", 'id,text,label\na7,"NA",negative\nb2,"good, really",positive\n')
    items = read_items(path, id_col="id", task=TASK)
    assert items.ids == ["a7", "b2"]
    assert items.texts == ["NA", "good, really"]
    assert items.gold == ["negative", "positive"]


def test_tsv_with_id_column_reads_quotes_literally(tmp_path):
    path = write(tmp_path / "d.tsv", 'id\ttext\tlabel\n1\t" analyze that " is crass\tnegative\n2\tfine\t\n')
    items = read_items(path, id_col="id")
    assert items.ids == ["1", "2"]
    assert items.texts == ['" analyze that " is crass', "fine"]
    assert items.gold == ["negative", None]


def test_json_list(tmp_path):
    path = write(tmp_path / "d.json", json.dumps([{"text": "a", "label": "positive"}, {"text": "b"}]))
    items = read_items(path, task=TASK)
    assert items.texts == ["a", "b"] and items.gold == ["positive", None]


def test_bom_is_ignored(tmp_path):
    path = write(tmp_path / "d.csv", "\ufefftext\nhello\n")
    assert read_items(path).texts == ["hello"]


def test_dataframe(tmp_path):
    frame = pd.DataFrame(
        {"uid": [10, 11, 12], "review": ["x", "y", "z"], "label": ["positive", None, np.nan], "n": [1, 2, 3]}
    )
    items = read_items(frame, text_col="review", id_col="uid", keep=("n",), task=TASK)
    assert items.source == "<DataFrame>"
    assert items.ids == ["10", "11", "12"]
    assert items.gold == ["positive", None, None]
    assert items.extra == {"n": [1, 2, 3]}


def test_dataset_like_object_is_read_through_to_pandas():
    class Dataset:
        def to_pandas(self) -> pd.DataFrame:
            return pd.DataFrame({"text": ["a", "b"], "label": ["negative", "positive"]})

    items = read_items(Dataset())
    assert items.texts == ["a", "b"] and items.source == "<Dataset>"


def test_label_column_absent_or_disabled(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "oops"}])
    assert read_items(path, label_col=None, task=TASK).gold is None
    assert read_items(path, label_col="gold").gold is None


def test_ner_task_does_not_check_row_labels(tmp_path):
    ner = Task(name="n", kind="ner", description="d", labels={"Chemical": "c"})
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "negative"}])
    assert read_items(path, task=ner).gold == ["negative"]


def test_subset_and_len():
    items = Items(
        ids=["a", "b", "c"], texts=["x", "y", "z"], gold=["1", None, "3"], source="s", extra={"k": [1, 2, 3]}
    )
    sub = items.subset(np.array([2, 0]))
    assert len(sub) == 2
    assert (sub.ids, sub.texts, sub.gold, sub.extra) == (["c", "a"], ["z", "x"], ["3", "1"], {"k": [3, 1]})
    assert Items(ids=["a"], texts=["x"], gold=None, source="s").subset([0]).gold is None
    with pytest.raises(ValueError):
        Items(ids=["a"], texts=["x", "y"], gold=None, source="s")


def test_limit_larger_than_data_keeps_everything(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": t} for t in "abc"])
    assert read_items(path, limit=10, seed=0).texts == ["a", "b", "c"]
    with pytest.raises(FreeALError, match="limit must be a positive integer"):
        read_items(path, limit=0)


# --- bad input: one FreeALError naming file, row and problem -----------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FreeALError, match=r"nope\.jsonl: cannot read the file"):
        read_items(tmp_path / "nope.jsonl")


def test_directory_is_not_readable(tmp_path):
    folder = tmp_path / "d.csv"
    folder.mkdir()
    with pytest.raises(FreeALError, match=r"d\.csv: not a data file, nor a folder written by save_to_disk"):
        read_items(folder)


def test_hugging_face_dataset_class_ids_become_names_and_folders_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    data = datasets.Dataset.from_dict(
        {"text": ["bad", "good", "unsure"], "label": [0, 1, -1]}, features=features
    )
    items = read_items(data, task=TASK)
    assert items.texts == ["bad", "good", "unsure"] and items.gold == ["negative", "positive", None]
    data.save_to_disk(tmp_path / "one")
    assert read_items(tmp_path / "one", task=TASK).gold == ["negative", "positive", None]
    datasets.DatasetDict({"train": data, "test": data}).save_to_disk(tmp_path / "both")
    with pytest.raises(FreeALError, match=r"holds the splits train, test; give one split's folder"):
        read_items(tmp_path / "both")
    assert read_items(tmp_path / "both" / "test").source == str(tmp_path / "both" / "test")


def test_hugging_face_ner_dataset_reads_ner_tags_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    from freeal.data import read_sentences

    names = ["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease"]
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "tokens": datasets.Sequence(datasets.Value("string")),
            "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names)),
        }
    )
    data = datasets.Dataset.from_dict(
        {
            "id": ["a", "b"],
            "tokens": [["Aspirin", "helps"], ["no", "fever", "here"]],
            "ner_tags": [[1, 0], [0, 3, 0]],
        },
        features=features,
    )
    data.save_to_disk(tmp_path / "ner")
    task = Task(
        name="cdr", kind="ner", description="Chemicals and diseases.", labels={"Chemical": "", "Disease": ""}
    )
    for source in (data, tmp_path / "ner"):
        sentences = read_sentences(source, task=task)
        assert sentences.ids == ["a", "b"] and sentences.tokens[1] == ["no", "fever", "here"]
        assert sentences.gold == [["B-Chemical", "O"], ["O", "B-Disease", "O"]]


def test_unknown_extension(tmp_path):
    path = write(tmp_path / "d.xlsx", "x")
    with pytest.raises(FreeALError, match=r"d\.xlsx: unknown file type '\.xlsx'; use one of .*\.jsonl"):
        read_items(path)


def test_unsupported_object():
    with pytest.raises(FreeALError, match="cannot read data of type int"):
        read_items(42)


def test_non_utf8_jsonl_names_the_row(tmp_path):
    path = write(tmp_path / "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(FreeALError, match=r"d\.jsonl: row 2: not valid UTF-8 \(byte 0xe9"):
        read_items(path)


def test_non_utf8_csv_names_the_line(tmp_path):
    path = write(tmp_path / "d.csv", b"text\nok\ncaf\xe9\n")
    with pytest.raises(FreeALError, match=r"d\.csv: line 3: not valid UTF-8"):
        read_items(path)


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b",}\n')
    with pytest.raises(FreeALError, match=r"d\.jsonl: row 3: not valid JSON"):
        read_items(path)


def test_invalid_json_file(tmp_path):
    path = write(tmp_path / "d.json", '[{"text": "a"},\n oops]')
    with pytest.raises(FreeALError, match=r"d\.json: line 2: not valid JSON"):
        read_items(path)


def test_json_file_not_a_list(tmp_path):
    path = write(tmp_path / "d.json", '{"text": "a"}')
    with pytest.raises(FreeALError, match="must hold a list of objects"):
        read_items(path)


def test_line_not_an_object(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, ["text", "b"]])
    with pytest.raises(FreeALError, match=r"d\.jsonl: row 2: not a JSON object \(got a list\)"):
        read_items(path)


def test_json_list_item_not_an_object(tmp_path):
    path = write(tmp_path / "d.json", '[{"text": "a"}, "b"]')
    with pytest.raises(FreeALError, match=r"d\.json: row 2: not a JSON object \(got str 'b'\)"):
        read_items(path)


def test_missing_text_column_jsonl(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"sentence": "b", "label": "x"}])
    with pytest.raises(FreeALError, match=r"row 2: no column 'text' \(keys: sentence, label\)"):
        read_items(path)


def test_missing_text_column_csv(tmp_path):
    path = write(tmp_path / "d.csv", "sentence,label\na,positive\n")
    with pytest.raises(FreeALError, match=r"d\.csv: no column 'text' \(columns: sentence, label\)"):
        read_items(path)


def test_missing_text_column_dataframe():
    with pytest.raises(FreeALError, match=r"<DataFrame>: no column 'text' \(columns: body\)"):
        read_items(pd.DataFrame({"body": ["a"]}))


def test_empty_text(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"text": f"t{i}"} for i in range(6)] + [{"text": ""}])
    with pytest.raises(FreeALError, match=r"data\.jsonl: row 7: text is empty"):
        read_items(path)


def test_whitespace_only_text_csv(tmp_path):
    path = write(tmp_path / "d.csv", 'text\nfine\n"   "\n')
    with pytest.raises(FreeALError, match=r"d\.csv: row 2: text is only whitespace"):
        read_items(path)


@pytest.mark.parametrize(("value", "got"), [(5, "int 5"), (None, "null"), (["a"], "a list")])
def test_text_not_a_string(tmp_path, value, got):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"text": value}])
    with pytest.raises(FreeALError, match=rf"row 2: text is not a string \(got {got}\)"):
        read_items(path)


def test_text_missing_in_dataframe():
    with pytest.raises(
        FreeALError, match=r"<DataFrame>: row 2: text is not a string \(got a missing value\)"
    ):
        read_items(pd.DataFrame({"text": ["a", math.nan]}))


def test_duplicate_ids(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl", [{"id": 1, "text": "a"}, {"id": 2, "text": "b"}, {"id": "1", "text": "c"}]
    )
    with pytest.raises(FreeALError, match=r"row 3: duplicate id '1' \(first at row 1\)"):
        read_items(path, id_col="id")


def test_empty_id(tmp_path):
    path = write(tmp_path / "d.csv", "id,text\n1,a\n,b\n")
    with pytest.raises(FreeALError, match=r"d\.csv: row 2: id is empty"):
        read_items(path, id_col="id")


def test_missing_id_column(tmp_path):
    path = write(tmp_path / "d.csv", "text\na\n")
    with pytest.raises(FreeALError, match=r"no column 'uid' \(columns: text\)"):
        read_items(path, id_col="uid")


def test_gold_label_outside_the_label_set(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl", [{"text": "a", "label": "positive"}, {"text": "b", "label": "Neutral"}]
    )
    with pytest.raises(
        FreeALError,
        match=r"row 2: label 'Neutral' is not in the label set of task 'sentiment' \(negative, positive\)",
    ):
        read_items(path, task=TASK)


def test_label_not_a_string(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": ["positive"]}])
    with pytest.raises(FreeALError, match=r"row 1: label is not a string or an integer \(got a list\)"):
        read_items(path)


@pytest.mark.parametrize(
    ("name", "content"), [("d.jsonl", "\n  \n"), ("d.csv", ""), ("d.csv", "text,label\n")]
)
def test_empty_file(tmp_path, name, content):
    path = write(tmp_path / name, content)
    with pytest.raises(FreeALError, match=r"d\.(jsonl|csv): no rows"):
        read_items(path)


def test_empty_json_list(tmp_path):
    with pytest.raises(FreeALError, match=r"d\.json: no rows"):
        read_items(write(tmp_path / "d.json", "[]"))


def test_missing_keep_column(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "a", "bt": "x"}, {"text": "b"}])
    with pytest.raises(FreeALError, match=r"row 2: no column 'bt' \(keys: text\)"):
        read_items(path, keep=("bt",))
    csv_path = write(tmp_path / "d.csv", "text\na\n")
    with pytest.raises(FreeALError, match=r"d\.csv: no column 'bt'"):
        read_items(csv_path, keep=("bt",))


def test_bad_csv(tmp_path):
    path = write(tmp_path / "d.csv", 'text,label\n"a",positive\n"b",positive,extra\n')
    with pytest.raises(FreeALError, match=r"d\.csv: not valid CSV"):
        read_items(path)


def test_short_tsv_row_has_an_empty_text(tmp_path):
    path = write(tmp_path / "d.tsv", "label\ttext\npositive\ta\nnegative\n")
    with pytest.raises(FreeALError, match=r"d\.tsv: row 2: text is empty"):
        read_items(path)


# --- writing -----------------------------------------------------------------------------------


def test_write_and_read_jsonl_round_trip(tmp_path):
    path = tmp_path / "out" / "labels.jsonl"
    rows = [
        {"id": "0", "label": "positive", "p": np.float32(0.5), "v": np.array([1, 2])},
        {"id": "1", "t": "é"},
    ]
    assert write_jsonl_atomic(path, rows) == path
    assert read_jsonl(path) == [
        {"id": "0", "label": "positive", "p": 0.5, "v": [1, 2]},
        {"id": "1", "t": "é"},
    ]
    assert "é" in path.read_text(encoding="utf-8")
    write_jsonl_atomic(path, iter([{"a": 1}]))
    assert read_jsonl(path) == [{"a": 1}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["labels.jsonl"]


def test_write_jsonl_atomic_keeps_old_file_when_interrupted(tmp_path):
    path = write_jsonl_atomic(tmp_path / "labels.jsonl", [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_jsonl_atomic(path, rows())
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["labels.jsonl"]


def test_write_jsonl_atomic_rejects_unserialisable(tmp_path):
    with pytest.raises(TypeError):
        write_jsonl_atomic(tmp_path / "x.jsonl", [{"a": object()}])
    assert list(tmp_path.iterdir()) == []


def test_read_jsonl_errors_name_the_line(tmp_path):
    path = write(tmp_path / "r.jsonl", '{"a": 1}\n42\n')
    with pytest.raises(FreeALError, match=r"r\.jsonl: row 2: not a JSON object \(got int 42\)"):
        read_jsonl(path)

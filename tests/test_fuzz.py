"""Fuzzing the data readers and the task loader: every input ends in data or in one FreeALError that
names the file (and, where there is one, the row), never in another exception.

``FREEAL_FUZZ_EXAMPLES`` sets the examples per property (bench/faults.py fuzz runs thousands).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from freeal.data import read_items, read_sentences
from freeal.errors import FreeALError
from freeal.tasks import Task, load_task

EXAMPLES = int(os.environ.get("FREEAL_FUZZ_EXAMPLES", "120"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
TASK = Task(name="s", description="Sentiment.", labels={"negative": "bad", "positive": "good"})
NER = Task(
    name="n", kind="ner", description="Entities.", labels={"Chemical": "a drug", "Disease": "an illness"}
)

# Cells that real files hold, good and bad: texts, empty and blank strings, NUL bytes, labels in
# and out of the set, numbers, booleans, nulls, lists, objects, a 1 MB line.
text_values = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "   ", "\x00", "a\x00b", "ok text", "x" * (1 << 20), "\ufeffbom text", "line\r\n"]),
    st.integers(),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
label_values = st.one_of(
    st.sampled_from(["negative", "positive", "neutral", "", None, 1, 2.5, True]), text_values
)
id_values = st.one_of(st.sampled_from(["1", "1", "2", "", None, 3, -1, 1.5]), st.text(max_size=4))
rows = st.lists(
    st.fixed_dictionaries(
        {},
        optional={"text": text_values, "label": label_values, "id": id_values, "other": text_values},
    ),
    max_size=6,
)
line_endings = st.sampled_from(["\n", "\r\n", "\r"])
prefixes = st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe", b"\x00"])
suffixes = st.sampled_from([".jsonl", ".json", ".csv", ".tsv"])


def _write(suffix: str, content: bytes) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, prefix="fuzz-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(content)
    return Path(name)


def _render(table: list[dict], suffix: str, newline: str) -> str:
    if suffix == ".jsonl":
        return newline.join(json.dumps(r) for r in table)
    if suffix == ".json":
        return json.dumps(table)
    sep = "," if suffix == ".csv" else "\t"
    columns = sorted({k for r in table for k in r}) or ["text"]
    lines = [sep.join(columns)] + [sep.join(str(r.get(c, "")) for c in columns) for r in table]
    return newline.join(lines)


def _read_or_explain(path: Path, reader) -> None:  # type: ignore[no-untyped-def]
    try:
        reader(path)
    except FreeALError as exc:
        message = str(exc)
        assert str(path) in message, message  # names the file
        assert "\n" not in message.strip(), message  # one line
    finally:
        path.unlink()


def _items(path: Path, id_col: str | None) -> None:
    items = read_items(path, id_col=id_col, task=TASK)
    assert len(items.ids) == len(set(items.ids)) == len(items.texts)
    assert all(isinstance(t, str) and t.strip() for t in items.texts)
    assert items.gold is None or set(items.gold) <= {*TASK.labels, None}


@SETTINGS
@given(
    table=rows, suffix=suffixes, newline=line_endings, prefix=prefixes, id_col=st.sampled_from([None, "id"])
)
def test_table_files_are_read_or_refused_in_one_line(table, suffix, newline, prefix, id_col) -> None:
    content = prefix + _render(table, suffix, newline).encode("utf-8", "surrogatepass")
    _read_or_explain(_write(suffix, content), lambda p: _items(p, id_col))


@SETTINGS
@given(content=st.binary(max_size=300), suffix=suffixes)
def test_arbitrary_bytes_are_read_or_refused_in_one_line(content, suffix) -> None:
    _read_or_explain(_write(suffix, content), lambda p: _items(p, None))


token_lists = st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=5)
tag_lists = st.lists(
    st.one_of(
        st.sampled_from(["O", "B-Chemical", "I-Chemical", "B-Disease", "I-Disease", "I-Other", "X"]),
        st.text(max_size=4),
        st.none(),
    ),
    max_size=5,
)
sentence_rows = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "tokens": st.one_of(token_lists, text_values),
            "tags": st.one_of(tag_lists, text_values),
            "text": text_values,
            "id": id_values,
        },
    ),
    max_size=5,
)


@SETTINGS
@given(table=sentence_rows, newline=line_endings, prefix=prefixes)
def test_sentence_files_are_read_or_refused_in_one_line(table, newline, prefix) -> None:
    content = prefix + newline.join(json.dumps(r) for r in table).encode("utf-8", "surrogatepass")
    _read_or_explain(_write(".jsonl", content), lambda p: read_sentences(p, task=NER))


@SETTINGS
@given(
    lines=st.lists(
        st.one_of(
            st.just(""),
            st.just("-DOCSTART- O"),
            st.text(max_size=20),
            st.builds(
                lambda t, g: f"{t} {g}",
                st.text(min_size=1, max_size=6),
                st.sampled_from(["O", "B-Chemical", "I-Disease", "B-Nope", "I-Chemical"]),
            ),
        ),
        max_size=12,
    ),
    newline=line_endings,
)
def test_conll_files_are_read_or_refused_in_one_line(lines, newline) -> None:
    content = newline.join(lines).encode("utf-8", "surrogatepass")
    _read_or_explain(_write(".conll", content), lambda p: read_sentences(p, task=NER))


task_docs = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["name", "kind", "description", "labels", "scheme", "extra"]),
            st.one_of(text_values, st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
            max_size=6,
        ),
    ),
)


@SETTINGS
@given(content=task_docs, suffix=st.sampled_from([".json", ".yaml"]))
def test_task_files_are_read_or_refused_in_one_line(content, suffix) -> None:
    _read_or_explain(_write(suffix, content), load_task)

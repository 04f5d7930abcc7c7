"""Read user data sets into one typed structure, and write result files safely.

Every reader ends in :class:`Items`: ids, texts, and (apart from them) gold labels. Gold labels are
kept in their own field because they exist only for evaluation; the labeling code takes texts and
never needs to look at them.

Bad input raises one :class:`~freeal.errors.FreeALError` whose message names the file (or
``<DataFrame>``), the row and the problem, e.g. ``data.jsonl: row 7: text is empty``, so that a user
can fix a 100,000-row file without a debugger. Row numbers are 1-based: for JSONL the row number is
the line number (blank lines are skipped but counted); for CSV/TSV, a DataFrame and a ``.json`` list
it is the position among the data rows (the header is not a row).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import math
import numbers
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from freeal.errors import FreeALError

if TYPE_CHECKING:
    from freeal.tasks import Task

__all__ = ["Items", "read_items", "read_jsonl", "write_jsonl_atomic", "write_text_atomic"]

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_SUFFIXES = (*_JSONL_SUFFIXES, ".json", ".csv", ".tsv")


@dataclass
class Items:
    """A data set to label, one entry per row in every list.

    ``gold`` holds true labels, read only to score; ``given`` holds labels to learn from (an LLM's,
    e.g. the output of ``freeal annotate`` given to ``freeal train``): two fields, so noisy labels
    are never mistaken for gold. Each is ``None`` when the data has no such column; otherwise it
    has one entry per row, ``None`` where that row has no label (null or empty, e.g. an abstention).
    ``extra`` carries the columns asked for with ``keep`` (e.g. back-translations).
    """

    ids: list[str]
    texts: list[str]
    gold: list[str | None] | None
    source: str
    extra: dict[str, list[Any]] = field(default_factory=dict)
    given: list[str | None] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts)
        lengths = [len(self.ids), *(len(v) for v in self.extra.values())]
        lengths += [len(labels) for labels in (self.gold, self.given) if labels is not None]
        if any(length != n for length in lengths):
            raise ValueError("Items: ids, texts, gold, given and extra columns must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> Items:
        """Rows at positions ``idx`` (in that order), e.g. a demonstration pool or a benchmark slice."""
        pos = [int(i) for i in idx]
        return Items(
            ids=[self.ids[i] for i in pos],
            texts=[self.texts[i] for i in pos],
            gold=None if self.gold is None else [self.gold[i] for i in pos],
            source=self.source,
            extra={k: [v[i] for i in pos] for k, v in self.extra.items()},
            given=None if self.given is None else [self.given[i] for i in pos],
        )


@dataclass
class _Table:
    """Raw rows before validation.

    ``columns`` is known for tabular input (CSV/TSV/DataFrame), where a missing column is a
    file-level problem; it is ``None`` for JSON input, where each object has its own keys.
    """

    source: str
    rows: list[dict[str, Any]]
    rownums: list[int]
    columns: list[str] | None


def read_items(
    data: str | os.PathLike[str] | pd.DataFrame | Any,
    *,
    text_col: str = "text",
    id_col: str | None = None,
    label_col: str | None = "label",
    keep: Sequence[str] = (),
    task: Task | None = None,
    limit: int | None = None,
    seed: int | None = None,
    given_col: str | None = None,
) -> Items:
    """Read and validate a data set.

    ``data`` is a path to a ``.jsonl``, ``.json`` (a list of objects), ``.csv`` or ``.tsv`` file, a
    ``pandas.DataFrame``, a Hugging Face ``datasets.Dataset`` (anything with ``to_pandas``; its
    ``ClassLabel`` ids become their names) or a folder written by its ``save_to_disk``.
    TSV is read literally (no quote handling), as GLUE-style files are written; use CSV for texts
    holding tabs or newlines.

    The label column is optional: when it is absent, or ``label_col=None``, ``gold`` is ``None``.
    With ``task`` (a classification task), every non-missing gold label must be one of its label
    names, so that a typo in the data shows up before a costly run rather than as a bad score.
    ``keep`` names extra columns to carry along in ``Items.extra``.

    ``limit`` takes a fixed random slice of that many rows (``seed`` fixes it), kept in the original
    order; the whole file is still validated, so a slice never hides a broken row.
    """
    table = _load(data)
    if not table.rows:
        raise FreeALError(f"{table.source}: no rows")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise FreeALError(f"limit must be a positive integer, got {limit!r}")
    items = _validate(table, text_col, id_col, {"gold": label_col, "given": given_col}, tuple(keep), task)
    if limit is not None and limit < len(items):
        pick = np.random.default_rng(seed).choice(len(items), size=limit, replace=False)
        items = items.subset(sorted(int(i) for i in pick))
    return items


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All objects of a JSONL file (blank lines skipped), for result and cache files.

    Errors name the file and the line, like :func:`read_items`.
    """
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file one at a time, as :func:`read_jsonl` reads them: for a reader
    that keeps a field or two of each row, not the rows."""
    return (obj for _, obj in _numbered_rows(Path(path)))


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL with :func:`write_text_atomic`, one line at a time (a million rows
    never become one string in memory); NumPy values become plain JSON."""
    lines = (json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows)
    return write_text_atomic(path, lines)


def write_text_atomic(path: str | os.PathLike[str], text: str | Iterable[str]) -> Path:
    """Write ``text`` (a string, or pieces of one written as they come) so that ``path`` holds
    either the old or the whole new content.

    The text goes to a temporary file in the same folder, which then replaces ``path`` in one
    ``os.replace``; a run killed halfway leaves no truncated result file behind to be mistaken for
    a finished one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            if isinstance(text, str):
                fh.write(text)
            else:
                fh.writelines(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# --- loading ---------------------------------------------------------------------------------


def _load(data: Any) -> _Table:
    if isinstance(data, pd.DataFrame):
        return _from_frame(data, "<DataFrame>")
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        return _from_frame(dataset_frame(path), str(path)) if path.is_dir() else _load_path(path)
    if hasattr(data, "to_pandas"):  # a datasets.Dataset, without importing datasets
        return _from_frame(dataset_frame(data), f"<{type(data).__name__}>")
    raise FreeALError(
        f"cannot read data of type {type(data).__name__}: give a file path, a pandas DataFrame, "
        "a datasets.Dataset or a folder written by its save_to_disk"
    )


def load_saved_dataset(path: Path) -> Any:
    """The ``datasets.Dataset`` that ``save_to_disk`` wrote in ``path`` (one split, not a dict)."""
    from freeal.extras import require

    require("datasets", what=f"reading the Hugging Face dataset folder {path}")
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise FreeALError(f"{path}: not a data file, nor a folder written by save_to_disk ({exc})") from exc
    if isinstance(data, datasets.DatasetDict):
        raise FreeALError(
            f"{path} holds the splits {', '.join(data)}; give one split's folder, "
            f"e.g. {path / next(iter(data))}"
        )
    return data


def dataset_frame(data: Any) -> pd.DataFrame:
    """A ``datasets.Dataset`` (or the folder its ``save_to_disk`` wrote) as a DataFrame, with
    ``ClassLabel`` ids (also inside sequences) as their names: freeal's labels are names, so a class
    id would fail the task's label check; sequences become lists, as the NER reader expects."""
    if isinstance(data, (str, os.PathLike)):
        data = load_saved_dataset(Path(data))
    frame = data.to_pandas()
    if not isinstance(frame, pd.DataFrame):
        raise FreeALError(f"cannot read data of type {type(data).__name__}: to_pandas() gave no DataFrame")
    for col, feature in (getattr(data, "features", None) or {}).items():
        inner = getattr(feature, "feature", None)
        if hasattr(feature, "int2str"):
            frame[col] = [_class_name(feature, v) for v in frame[col]]
        elif inner is not None:
            named = hasattr(inner, "int2str")
            frame[col] = [
                None if v is None else [_class_name(inner, x) if named else x for x in v] for v in frame[col]
            ]
    return frame


def _class_name(feature: Any, value: Any) -> str | None:
    """The name of class id ``value``; ``datasets`` writes -1 (or nothing) for a missing label."""
    return None if _missing(value) or int(value) < 0 else str(feature.int2str(int(value)))


def _load_path(path: Path) -> _Table:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise FreeALError(
            f"{path}: unknown file type {suffix or '(none)'!r}; use one of {', '.join(_SUFFIXES)}"
        )
    if suffix in _JSONL_SUFFIXES:
        return _read_jsonl(path)
    text = _decode(path, _read_bytes(path), unit="line")
    if suffix == ".json":
        return _parse_json_list(path, text)
    return _parse_delimited(path, text, sep="\t" if suffix == ".tsv" else ",")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FreeALError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc


def _decode(path: Path, raw: bytes, unit: str, first: int = 1) -> str:
    """UTF-8 text of a whole file, or of the one line numbered ``first`` (a leading BOM dropped); a
    bad byte is reported with its line and column."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first + raw.count(b"\n", 0, exc.start)
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise FreeALError(
            f"{path}: {unit} {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {col}); "
            "save the file as UTF-8"
        ) from exc


def _read_jsonl(path: Path) -> _Table:
    rows: list[dict[str, Any]] = []
    rownums: list[int] = []
    for n, obj in _numbered_rows(path):
        rows.append(obj)
        rownums.append(n)
    return _Table(str(path), rows, rownums, columns=None)


def _numbered_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line, read line by line: a run file of a million
    rows is never one string in memory. Errors name the file and the line."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise FreeALError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    with fh:
        for n, raw in enumerate(fh, start=1):
            line = _decode(path, raw, "row", n)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                message = f"not valid JSON ({exc.msg} at column {exc.colno})"
                raise FreeALError(f"{path}: row {n}: {message}") from exc
            if not isinstance(obj, dict):
                raise FreeALError(f"{path}: row {n}: not a JSON object (got {_describe(obj)})")
            yield n, obj


def _parse_json_list(path: Path, text: str) -> _Table:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FreeALError(
            f"{path}: line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if not isinstance(obj, list):
        raise FreeALError(f"{path}: a .json data file must hold a list of objects (got {_describe(obj)})")
    for n, row in enumerate(obj, start=1):
        if not isinstance(row, dict):
            raise FreeALError(f"{path}: row {n}: not a JSON object (got {_describe(row)})")
    return _Table(str(path), obj, list(range(1, len(obj) + 1)), columns=None)


def _parse_delimited(path: Path, text: str, sep: str) -> _Table:
    # dtype=str and keep_default_na=False: "NA", "null" or "1e5" in a text column stay text.
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if sep == "\t" else csv.QUOTE_MINIMAL
    kind = "TSV" if sep == "\t" else "CSV"
    try:
        with warnings.catch_warnings():
            # pandas only warns when a row has more fields than the header, and drops the extra ones
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, quoting=quoting, index_col=False
            )
    except pd.errors.EmptyDataError as exc:
        raise FreeALError(f"{path}: no rows (the file is empty)") from exc
    except pd.errors.ParserWarning as exc:
        raise FreeALError(f"{path}: not valid {kind} ({_wide_row(text, sep, quoting)})") from exc
    except (pd.errors.ParserError, ValueError, csv.Error) as exc:
        raise FreeALError(f"{path}: not valid {kind} ({str(exc).strip()})") from exc
    return _from_frame(frame, str(path))


def _wide_row(text: str, sep: str, quoting: Literal[0, 1, 2, 3]) -> str:
    """Where a delimited file first has more fields than its header (pandas says only that it
    happened), so the user can find the unquoted separator."""
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep, quoting=quoting)
        width = len(next(reader, []))
        for fields in reader:
            if len(fields) > width:
                return (
                    f"line {reader.line_num}: {len(fields)} fields where the header has {width}; "
                    "quote fields that hold the separator"
                )
    except csv.Error as exc:
        return f"line {reader.line_num}: {exc}"
    return "a row has more fields than the header"


def _from_frame(frame: pd.DataFrame, source: str) -> _Table:
    frame = frame.rename(columns=str)
    rows = frame.to_dict(orient="records")
    return _Table(source, rows, list(range(1, len(rows) + 1)), columns=list(frame.columns))


# --- validation ------------------------------------------------------------------------------


def _validate(
    table: _Table,
    text_col: str,
    id_col: str | None,
    label_cols: dict[str, str | None],
    keep: tuple[str, ...],
    task: Task | None,
) -> Items:
    """Rows checked one by one; ``label_cols`` names the gold and the given label columns (each
    optional: a column absent from the data gives ``None``)."""
    src = table.source
    if table.columns is not None:
        for col in (text_col, id_col, *keep):
            if col is not None and col not in table.columns:
                raise FreeALError(f"{src}: no column {col!r} (columns: {_listing(table.columns)})")
        present = {k: c for k, c in label_cols.items() if c is not None and c in table.columns}
    else:
        present = {
            k: c for k, c in label_cols.items() if c is not None and any(c in row for row in table.rows)
        }
    # NER tasks name entity types, not row labels, so only a classification task checks gold.
    check = task if task is not None and task.kind == "classification" else None

    ids: list[str] = []
    texts: list[str] = []
    labels: dict[str, list[str | None]] = {k: [] for k in present}
    extra: dict[str, list[Any]] = {col: [] for col in keep}
    first_row_of: dict[str, int] = {}
    for n, row in zip(table.rownums, table.rows, strict=True):
        where = f"{src}: row {n}"
        for col in (text_col, id_col, *keep):
            if col is not None and col not in row:
                raise FreeALError(f"{where}: no column {col!r} (keys: {_listing(row)})")

        text = row[text_col]
        if not isinstance(text, str):
            raise FreeALError(f"{where}: {text_col} is not a string (got {_describe(text)})")
        if not text.strip():
            raise FreeALError(f"{where}: {text_col} is {'empty' if not text else 'only whitespace'}")
        texts.append(text)

        if id_col is None:
            ids.append(str(len(ids)))
        else:
            ids.append(_unique_id(row[id_col], where, id_col, n, first_row_of))

        for kind, label_col in present.items():
            label = _scalar_str(row.get(label_col), where, label_col)
            if label is not None and check is not None and label not in check.labels:
                raise FreeALError(
                    f"{where}: {label_col} {label!r} is not in the label set of task {check.name!r} "
                    f"({_listing(check.labels)})"
                )
            labels[kind].append(label)

        for col in keep:
            value = row[col]
            extra[col].append(None if _missing(value) else value)

    return Items(
        ids=ids, texts=texts, gold=labels.get("gold"), source=src, extra=extra, given=labels.get("given")
    )


def _unique_id(value: Any, where: str, col: str, n: int, first_row_of: dict[str, int]) -> str:
    """A row's id as a string, refused when empty or already taken (``first_row_of`` records them)."""
    rid = _scalar_str(value, where, col)
    if rid is None:
        raise FreeALError(f"{where}: {col} is empty")
    if rid in first_row_of:
        raise FreeALError(f"{where}: duplicate {col} {rid!r} (first at row {first_row_of[rid]})")
    first_row_of[rid] = n
    return rid


def _scalar_str(value: Any, where: str, col: str) -> str | None:
    """An id or label as a string; ``None`` when missing (null, NaN, empty or whitespace)."""
    if _missing(value):
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    raise FreeALError(f"{where}: {col} is not a string or an integer (got {_describe(value)})")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if _missing(value):
        return "a missing value"
    if isinstance(value, (bool, np.bool_)):
        return f"boolean {str(bool(value)).lower()}"
    if isinstance(value, (numbers.Number, str)):
        return f"{type(value).__name__} {value!r}"
    names: dict[type, str] = {dict: "an object", list: "a list"}
    return names.get(type(value), type(value).__name__)


def _listing(names: Iterable[Any], most: int = 20) -> str:
    names = [str(n) for n in names]
    if not names:
        return "none"
    more = f", ... ({len(names)} in all)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# --- token-level data (NER) ------------------------------------------------------------------


@dataclass
class Sentences:
    """A token-level data set: ids, tokens per sentence, and (for evaluation only) IOB2 tags."""

    ids: list[str]
    tokens: list[list[str]]
    gold: list[list[str] | None] | None
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def texts(self) -> list[str]:
        """Each sentence as its tokens joined by spaces: what the LLM and the embedder see."""
        return [" ".join(t) for t in self.tokens]

    def subset(self, idx: Sequence[int]) -> Sentences:
        pos = [int(i) for i in idx]
        return Sentences(
            ids=[self.ids[i] for i in pos],
            tokens=[self.tokens[i] for i in pos],
            gold=None if self.gold is None else [self.gold[i] for i in pos],
            source=self.source,
        )


_CONLL_SUFFIXES = (".conll", ".iob", ".bio", ".txt")


def read_sentences(
    data: str | os.PathLike[str] | Sequence[str] | Sequence[Sequence[str]],
    *,
    task: Task | None = None,
    tags_key: str | None = "tags",
    limit: int | None = None,
    seed: int | None = None,
) -> Sentences:
    """Read sentences for NER.

    ``data`` is a JSONL file of ``{"tokens": [...], "tags": [...]}`` (or ``{"text": ...}``, split by
    :func:`freeal.ner.tokenize`; an ``id`` is used when present), a CoNLL-style column file
    (``.conll``/``.iob``/``.bio``/``.txt``: token first, IOB2 tag last, a blank line between
    sentences, ``-DOCSTART-`` lines skipped), a ``datasets.Dataset`` or a folder written by its
    ``save_to_disk`` (``ClassLabel`` tags become their names; ``ner_tags`` is read when there is no
    ``tags`` column), or a list of strings or token lists. Tags are optional (``tags_key=None``
    ignores them); when present they are checked as IOB2 over the task's types.
    ``limit``/``seed`` take a fixed random slice, as in :func:`read_items`.
    """
    from freeal.ner import check_tags, tokenize

    if hasattr(data, "to_pandas") or (isinstance(data, (str, os.PathLike)) and Path(data).is_dir()):
        named = str(data) if isinstance(data, (str, os.PathLike)) else "<Dataset>"
        table = _from_frame(dataset_frame(data), named)
        source, rows = table.source, list(zip(table.rownums, table.rows, strict=True))
        if tags_key and tags_key not in (table.columns or []) and "ner_tags" in (table.columns or []):
            tags_key = "ner_tags"  # the Hugging Face hub's name for IOB2 tags
    elif isinstance(data, (str, os.PathLike)):
        path = Path(data)
        source = str(path)
        if path.suffix.lower() in _CONLL_SUFFIXES:
            rows = _read_conll(path)
        elif path.suffix.lower() in _JSONL_SUFFIXES:
            table = _read_jsonl(path)
            rows = list(zip(table.rownums, table.rows, strict=True))
        else:
            raise FreeALError(
                f"{path}: unknown file type {path.suffix or '(none)'!r} for sentences; use .jsonl or "
                f"one of {', '.join(_CONLL_SUFFIXES)}"
            )
    else:
        source = "<list>"
        rows = [
            (n, {"text": x} if isinstance(x, str) else {"tokens": list(x)}) for n, x in enumerate(data, 1)
        ]
    if not rows:
        raise FreeALError(f"{source}: no sentences")
    ids, tokens, gold = [], [], []
    first_row_of: dict[str, int] = {}
    for n, row in rows:
        where = f"{source}: row {n}"
        if not isinstance(row, dict):
            raise FreeALError(f"{where}: expected an object with tokens (and tags) or text")
        if "tokens" in row:
            toks = row["tokens"]
            if not isinstance(toks, list) or not all(isinstance(t, str) and t.strip() for t in toks):
                raise FreeALError(f"{where}: tokens must be a list of non-empty strings")
        elif isinstance(row.get("text"), str):
            toks = tokenize(row["text"])
        else:
            raise FreeALError(f"{where}: no 'tokens' list and no 'text' string")
        if not toks:
            raise FreeALError(f"{where}: the sentence has no tokens")
        tags = row.get(tags_key) if tags_key else None
        if tags is not None:
            if not isinstance(tags, list) or len(tags) != len(toks):
                raise FreeALError(f"{where}: {len(toks)} tokens but tags are not a list of {len(toks)}")
            if not all(isinstance(t, str) for t in tags):
                raise FreeALError(f"{where}: tags must be strings (IOB2 tags such as O or B-{_first(task)})")
            if task is not None:
                check_tags(tags, task.label_names, where)
        ids.append(_unique_id(row["id"], where, "id", n, first_row_of) if "id" in row else str(n))
        tokens.append([str(t) for t in toks])
        gold.append(tags)
    out = Sentences(ids, tokens, gold if any(g is not None for g in gold) else None, source)
    if limit is not None and limit < len(out):
        pick = np.random.default_rng(seed).choice(len(out), size=limit, replace=False)
        out = out.subset(sorted(int(i) for i in pick))
    return out


def _first(task: Task | None) -> str:
    return task.label_names[0] if task is not None else "Type"


def _read_conll(path: Path) -> list[tuple[int, dict[str, Any]]]:
    text = _decode(path, _read_bytes(path), unit="line")
    rows: list[tuple[int, dict[str, Any]]] = []
    toks: list[str] = []
    tags: list[str] = []
    start = 1
    for n, line in enumerate([*text.splitlines(), ""], 1):
        cols = line.split()
        if cols and cols[0] == "-DOCSTART-":
            continue
        if not cols:
            if toks:
                rows.append((start, {"tokens": toks, "tags": tags}))
            toks, tags, start = [], [], n + 1
            continue
        if len(cols) < 2:
            raise FreeALError(f"{path}: line {n}: expected a token and a tag separated by whitespace")
        toks.append(cols[0])
        tags.append(cols[-1])
    return rows

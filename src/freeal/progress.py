"""What a run shows while it works: one rich progress bar per LLM pass (count, rate, time left), or
one JSON object a line on stderr for pipelines (``--json-logs``), or nothing (``--quiet``).

The mode is set once per process by the command line (:func:`set_mode`), so the library's stages
need only their ``progress`` flag and a ``say`` callback, whatever the display.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from freeal.config import SLMConfig

T = TypeVar("T")
Mode = Literal["rich", "json", "quiet"]

#: Seconds between two JSON progress lines of one pass (the last line is always written).
JSON_EVERY = 5.0
_mode: Mode = "rich"
_json_handler: logging.Handler | None = None


def slm_line(entry: dict, cfg: SLMConfig) -> str:
    """One entry of an SLM's training log as a line: an epoch of ``cfg.epochs``, or a linear SLM's
    one fit."""
    step = "fit" if cfg.mode == "linear" else f"epoch {entry['epoch']}/{cfg.epochs}"
    return f"{step}: loss {entry['loss']:.4f}, clean {entry['clean_fraction']:.3f}, {entry['seconds']:.1f} s"


def set_mode(mode: Mode) -> None:
    """Choose the display for this process; ``json`` also turns freeal's log records into JSON lines
    (and another mode takes that handler off again, so a library caller's logging is left as found)."""
    global _mode, _json_handler
    _mode = mode
    logger = logging.getLogger("freeal")
    if _json_handler is not None:
        logger.removeHandler(_json_handler)
        logger.propagate = True
        _json_handler = None
    if mode == "json":
        _json_handler = logging.StreamHandler(sys.stderr)
        _json_handler.setFormatter(_JsonFormatter())
        logger.addHandler(_json_handler)
        logger.propagate = False


def mode() -> Mode:
    """The display chosen for this process."""
    return _mode


def emit(event: str, **fields: Any) -> None:
    """Write one JSON line (``time``, ``event`` and ``fields``) to stderr."""
    line = {"time": _stamp(time.time()), "event": event, **fields}
    sys.stderr.write(json.dumps(line, default=str) + "\n")
    sys.stderr.flush()


def sayer(console_print: Callable[[str], None]) -> Callable[[str], None]:
    """The ``say`` callback of the current mode: the console, a JSON ``message`` line, or silence."""
    if _mode == "json":
        return lambda text: emit("message", text=str(text))
    if _mode == "quiet":
        return lambda text: None
    return console_print


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": _stamp(record.created),
                "event": "log",
                "level": record.levelname.lower(),
                "logger": record.name,
                "text": record.getMessage(),
            }
        )


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # type: ignore[no-untyped-def]
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} items/s" if speed else "- items/s")


def progress_bar(iterable: Iterable[T], total: int, description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate with the current mode's display of count, rate and time left."""
    if not enabled or _mode == "quiet":
        yield from iterable
        return
    if _mode == "json":
        yield from _json_progress(iterable, total, description)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task_id)


def _json_progress(iterable: Iterable[T], total: int, description: str) -> Iterator[T]:
    """``progress`` lines at most every :data:`JSON_EVERY` seconds and one when the pass ends; the
    rate is the pass's own measured mean, and the time left follows from it."""
    start = last = time.perf_counter()
    done = 0

    def line() -> None:
        elapsed = time.perf_counter() - start
        rate = done / elapsed if elapsed > 0 else None
        left = (total - done) / rate if rate else None
        emit("progress", stage=description, done=done, total=total, per_second=rate, seconds_left=left)

    for item in iterable:
        yield item
        done += 1
        if time.perf_counter() - last >= JSON_EVERY:
            line()
            last = time.perf_counter()
    line()

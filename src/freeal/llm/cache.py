"""The on-disk cache of LLM calls and the ledger of what a run spent.

Every answer is stored in SQLite under a key made of the annotator's identity, the prompt, the label
set and the scoring mode, and committed as soon as it arrives. A rerun, or a run resumed after a
kill, therefore pays only for answers it has never received. WAL mode keeps a kill mid-write from
corrupting what was committed before.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from filelock import FileLock

from freeal.errors import FreeALError
from freeal.llm.base import Annotator, Generation, LabelScores, LazyPrompts, Message

A = TypeVar("A", LabelScores, Generation)


@dataclass
class Ledger:
    """What a run asked of the LLM: calls made, answers reused from the cache, tokens."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    abstained: int = 0

    def add(self, answer: LabelScores | Generation, *, cached: bool) -> None:
        if cached:
            self.cache_hits += 1
        else:
            self.calls += 1
            self.prompt_tokens += answer.prompt_tokens
            self.evaluated_tokens += answer.evaluated_tokens or (
                0 if isinstance(answer, LabelScores) else answer.prompt_tokens
            )
            self.completion_tokens += answer.completion_tokens
        self.abstained += isinstance(answer, LabelScores) and answer.label is None

    def since(self, before: Ledger) -> Ledger:
        """What was spent after the snapshot ``before`` (a copy taken with :func:`dataclasses.replace`)."""
        mine, theirs = asdict(self), asdict(before)
        return Ledger(**{k: mine[k] - theirs[k] for k in mine})

    def to_json(self) -> dict:
        return asdict(self)


def cache_key(identity: str, mode: str, messages: list[Message], labels: Sequence[str] = ()) -> str:
    payload = json.dumps([identity, mode, messages, list(labels)], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


#: The layout of the cache file; a file of another version is refused rather than misread.
SCHEMA_VERSION = 1


class CallCache:
    """A SQLite table of answers keyed by :func:`cache_key`; safe to share between threads.

    The file carries its schema version (``meta`` table). A file that is not SQLite, or a SQLite
    database that is not a freeal cache, is one :class:`FreeALError` naming it, never overwritten."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        #: held while this process asks the LLM for answers missing from the cache, so that two
        #: processes sharing the file never both pay for the same prompt (the second waits, then
        #: finds the first one's answers)
        self.asking = FileLock(f"{self.path}.lock")
        try:
            # Switching a new file to WAL and creating its tables takes locks that SQLite's busy
            # handler does not wait for: two processes opening one fresh cache at the same moment
            # made one fail with "database is locked". The set-up is therefore done one process at
            # a time; after it, WAL lets readers and one writer share the file.
            with FileLock(f"{self.path}.setup.lock"):
                self._db = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None, timeout=60
                )
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise FreeALError(
                f"{self.path}: not a readable freeal LLM cache ({exc}); point cache_path elsewhere or "
                "move the file away (its answers would be asked again)"
            ) from exc

    def _check_schema(self) -> None:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables - {"answers", "meta"}:
            raise FreeALError(
                f"{self.path}: a SQLite database that is not a freeal LLM cache (tables: "
                f"{', '.join(sorted(tables))}); point cache_path elsewhere"
            )
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        # a cache written before the version was recorded has the same layout as version 1
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
        )
        found = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        if found != str(SCHEMA_VERSION):
            raise FreeALError(
                f"{self.path}: an LLM cache of schema version {found}; this freeal reads version "
                f"{SCHEMA_VERSION}; point cache_path elsewhere"
            )

    def get_many(self, keys: Sequence[str]) -> dict[str, dict]:
        """The stored answers (as JSON objects) of those ``keys`` that are in the cache."""
        found: dict[str, dict] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start : start + 500])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, value FROM answers WHERE key IN ({marks})", chunk)
                found.update((k, json.loads(v)) for k, v in rows)
        return found

    def put(self, key: str, answer: LabelScores | Generation) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)",
                (key, json.dumps(answer.to_json())),
            )

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedAnnotator:
    """An annotator whose answers go through a :class:`CallCache`; counts everything in a :class:`Ledger`.

    Only prompts missing from the cache reach the wrapped backend, and each answer is written the
    moment it arrives, so killing a run loses at most the calls in flight.
    """

    def __init__(self, inner: Annotator, cache: CallCache, mode: str = "label-scores") -> None:
        self.inner = inner
        self.cache = cache
        self.mode = mode
        self.identity = inner.identity
        self.supports_grammar = bool(getattr(inner, "supports_grammar", False))
        self.ledger = Ledger()

    def score_many(
        self, prompts: Sequence[list[Message]], labels: Sequence[str]
    ) -> Iterator[tuple[int, LabelScores]]:
        keys = [cache_key(self.identity, self.mode, p, labels) for p in prompts]
        yield from self._through_cache(
            keys,
            LabelScores.from_json,
            lambda todo: self.inner.score_many(LazyPrompts(len(todo), lambda k: prompts[todo[k]]), labels),
        )

    def generate_many(
        self,
        prompts: Sequence[list[Message]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        grammars: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, Generation]]:
        """Free-text answers through the cache (keyed also by the sampling settings and grammar)."""
        mode = f"generate:max_tokens={max_tokens},t={temperature:g},seed={seed}"
        keys = [
            cache_key(self.identity, mode if grammars is None else f"{mode},grammar={grammars[i]}", p)
            for i, p in enumerate(prompts)
        ]
        yield from self._through_cache(
            keys,
            Generation.from_json,
            lambda todo: self.inner.generate_many(
                LazyPrompts(len(todo), lambda k: prompts[todo[k]]),
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                **({} if grammars is None else {"grammars": [grammars[i] for i in todo]}),
            ),
        )

    def _through_cache(
        self,
        keys: list[str],
        parse: Callable[[dict], A],
        ask: Callable[[list[int]], Iterable[tuple[int, A]]],
    ) -> Iterator[tuple[int, A]]:
        """Yield cached answers, then ask ``ask`` for the rest (given their positions; it yields
        positions in that list), storing each answer as it arrives."""
        hits = {k: parse(v) for k, v in self.cache.get_many(keys).items()}
        missing: list[int] = []
        for i, key in enumerate(keys):
            if key in hits:
                self.ledger.add(hits[key], cached=True)
                yield i, hits[key]
            else:
                missing.append(i)
        if not missing:
            return
        with self.cache.asking:
            # Another process may have answered some of them while this one waited for the lock.
            late = self.cache.get_many([keys[i] for i in missing])
            still: list[int] = []
            for i in missing:
                if keys[i] in late:
                    answer = parse(late[keys[i]])
                    self.ledger.add(answer, cached=True)
                    yield i, answer
                else:
                    still.append(i)
            # Identical prompts inside one request are asked once; the copies reuse the answer.
            copies: dict[str, list[int]] = {}
            for i in still:
                copies.setdefault(keys[i], []).append(i)
            todo = [group[0] for group in copies.values()]
            for j, answer in ask(todo) if todo else ():
                first, *rest = copies[keys[todo[j]]]
                self.cache.put(keys[first], answer)
                self.ledger.add(answer, cached=False)
                yield first, answer
                for i in rest:
                    self.ledger.add(answer, cached=True)
                    yield i, answer

"""What every annotator backend provides, whatever runs the model.

A backend turns chat prompts into :class:`LabelScores`: one answer per prompt that is always a label
of the set or an explicit abstention, never free text. Backends differ in how they get there
(log-probabilities of label tokens in llama.cpp; logprobs or a strict parse on an OpenAI-compatible
server), so the rest of freeal only sees this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, TypedDict, overload


class Message(TypedDict):
    role: str
    content: str


class LazyPrompts(Sequence[list["Message"]]):
    """``n`` prompts, each built by ``build(j)`` when read. A prompt is read once or twice (for its
    cache key, then for its request), so a million prompts, each holding its group's
    demonstrations, never sit in memory together."""

    def __init__(self, n: int, build: Callable[[int], list[Message]]) -> None:
        self._n = n
        self._build = build

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, j: int) -> list[Message]: ...
    @overload
    def __getitem__(self, j: slice) -> list[list[Message]]: ...
    def __getitem__(self, j: int | slice) -> list[Message] | list[list[Message]]:
        if isinstance(j, slice):
            return [self._build(k) for k in range(*j.indices(self._n))]
        if not -self._n <= j < self._n:
            raise IndexError(j)
        return self._build(j % self._n)


@dataclass
class LabelScores:
    """One annotator answer.

    ``scores`` are log-scores per label in the order asked for (log-probability of the label's tokens
    for scoring backends), or ``None`` when the backend could only name a label. ``label`` is ``None``
    when the annotator abstained (no label could be had).
    """

    label: str | None
    scores: list[float] | None
    prompt_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> LabelScores:
        return cls(**raw)


@dataclass
class Generation:
    """One free-text answer: written demonstrations, or an entity list (NER).

    ``evaluated_tokens`` is how many prompt tokens the model actually had to evaluate (a backend
    that reuses a shared prefix evaluates fewer than ``prompt_tokens``); 0 when unknown."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    evaluated_tokens: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> Generation:
        return cls(**raw)


class Annotator(Protocol):
    """A labeling backend.

    ``identity`` names everything that changes the answers (backend, model file or name, scoring
    mode); the cache keys on it, so two annotators with the same identity must answer alike.
    """

    identity: str
    supports_grammar: bool

    def score_many(
        self, prompts: Sequence[list[Message]], labels: Sequence[str]
    ) -> Iterator[tuple[int, LabelScores]]:
        """Answer every prompt; yield ``(index, answer)`` pairs as they complete, in any order."""
        ...

    def generate_many(
        self,
        prompts: Sequence[list[Message]],
        *,
        max_tokens: int,
        temperature: float,
        seed: int,
        grammars: Sequence[str] | None = None,
    ) -> Iterator[tuple[int, Generation]]:
        """Write a free-text answer to every prompt (sampled under ``seed``); yield ``(index, answer)``.

        ``grammars`` (one GBNF grammar per prompt) constrain the answers; only backends whose
        ``supports_grammar`` is true accept them."""
        ...


def softmax(scores: Sequence[float]) -> list[float]:
    """Normalize log-scores into probabilities (stable for very negative log-probabilities)."""
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


def log_softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    log_total = top + math.log(sum(math.exp(s - top) for s in scores))
    return [s - log_total for s in scores]

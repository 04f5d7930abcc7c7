"""Shared fixtures: the real data in ../shared/data, the small real models, and scripted LLMs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from freeal.llm.base import Generation, LabelScores

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The 135M SmolLM2 annotator: near chance, for plumbing."""
    from freeal.llm.llamacpp import LlamaCppAnnotator
    from freeal.llm.models import resolve_model

    path, name = resolve_model("smollm2-135m")
    return LlamaCppAnnotator(path, name=name, n_ctx=1024)


class OnePerCall:
    """A real annotator asked one prompt per call. Batched scoring computes a text in whatever batch
    it lands in, and llama.cpp's rounding differs a little between batches; a killed run resumes in
    other batches. Tests that compare a resumed run with an uninterrupted one label by label (on
    SmolLM2, whose labels are near ties) use this, so that an answer does not depend on which texts
    share its batch. It still depends, within that rounding, on how much of its prefix the model's
    cache held from the prompt before (a one-token tail runs other kernels than a longer one)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.identity = inner, inner.identity
        self.supports_grammar = inner.supports_grammar

    def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
        for i, prompt in enumerate(prompts):
            yield i, self.inner.score(prompt, labels)

    def generate_many(self, prompts, **kw):  # type: ignore[no-untyped-def]
        return self.inner.generate_many(prompts, **kw)


class ScriptedLLM:
    """A classification annotator that loads no model: ``label(text, labels)`` picks each answer from
    the text in the prompt (a label name, scored 0 against -3 for the others, or a score per label),
    ``seconds(prompt)`` is how long it works on it (one call after another), a token is 4
    characters; ``asked`` lists the texts asked, in order."""

    supports_grammar = False

    def __init__(
        self,
        label: Callable[[str, list[str]], str | dict[str, float]],
        seconds: Callable[[Any], float] = lambda prompt: 0.0,
        identity: str = "scripted-llm",
    ) -> None:
        self.label, self.seconds, self.identity = label, seconds, identity
        self.asked: list[str] = []

    def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
        for i, prompt in enumerate(prompts):
            content = prompt[-1]["content"]
            text = content.rsplit("Text: ", 1)[-1].removesuffix("\nLabel:")
            self.asked.append(text)
            time.sleep(self.seconds(prompt))
            answer = self.label(text, list(labels))
            given = answer if isinstance(answer, dict) else {answer: 0.0}
            scores = [given.get(name, -3.0) for name in labels]
            label = labels[max(range(len(labels)), key=scores.__getitem__)]
            sent = sum(len(m["content"]) for m in prompt) // 4
            yield i, LabelScores(label, scores, sent, len(content) // 4, 1)

    def generate_many(self, prompts, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("a zero-shot classification run writes no demonstrations")


class ScriptedWriter:
    """A backend that writes free text given in advance, one answer per prompt in the order asked;
    a request's answers come back last first (a served model's come in any order). It keeps each
    request's size (``requests``) and each prompt's last message and token budget (``asked``)."""

    identity = "scripted-writer"
    supports_grammar = False

    def __init__(self, answers: list[str]) -> None:
        self.answers = list(answers)
        self.requests: list[int] = []
        self.asked: list[tuple[str, int]] = []

    def generate_many(self, prompts, *, max_tokens, temperature, seed):  # type: ignore[no-untyped-def]
        self.requests.append(len(prompts))
        self.asked += [(p[-1]["content"], max_tokens) for p in prompts]
        mine, self.answers = self.answers[: len(prompts)], self.answers[len(prompts) :]
        for i in reversed(range(len(prompts))):
            yield i, Generation(mine[i], 10, 10)


@pytest.fixture
def scripted_writer() -> type[ScriptedWriter]:
    """:class:`ScriptedWriter`, to build with the test's answers."""
    return ScriptedWriter


@pytest.fixture(scope="session")
def one_per_call() -> type[OnePerCall]:
    """:class:`OnePerCall`, to wrap a real annotator with."""
    return OnePerCall


@pytest.fixture
def scripted_llm() -> type[ScriptedLLM]:
    """:class:`ScriptedLLM`, to build with the test's own rule (and pace)."""
    return ScriptedLLM

"""The call cache (reuse, de-duplication, ledger) and the assembly of split GGUF models."""

from __future__ import annotations

import hashlib
import sys

import pytest

from freeal.errors import FreeALError
from freeal.llm import models
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.prompts import classification_prompt
from freeal.tasks import Task

TASK = Task(name="s", description="Sentiment.", labels={"negative": "bad", "positive": "good"})


def test_rerun_is_served_from_disk_and_duplicates_are_asked_once(smollm2, tmp_path):
    texts = ["great fun", "a bore", "great fun", "fine acting"]
    prompts = [classification_prompt(TASK, t) for t in texts]
    first = CachedAnnotator(smollm2, CallCache(tmp_path / "c.sqlite"))
    answers = dict(first.score_many(prompts, TASK.label_names))
    assert sorted(answers) == [0, 1, 2, 3]
    assert first.ledger.calls == 3 and first.ledger.cache_hits == 1
    assert answers[0].scores == answers[2].scores
    assert first.ledger.prompt_tokens > first.ledger.evaluated_tokens > 0

    second = CachedAnnotator(smollm2, CallCache(tmp_path / "c.sqlite"))  # a new process, same file
    again = dict(second.score_many(prompts, TASK.label_names))
    assert second.ledger.calls == 0 and second.ledger.cache_hits == 4
    assert [again[i].scores for i in range(4)] == [answers[i].scores for i in range(4)]
    other_labels = dict(second.score_many(prompts[:1], ["positive", "negative"]))
    assert second.ledger.calls == 1 and other_labels[0].label in {"positive", "negative"}


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A model split over two fake packages on sys.path, registered like the real ones."""
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 500, b"c" * 700]
    for pkg, names in (("fakepart1", ["part01.bin", "part02.bin"]), ("fakepart2", ["part03.bin"])):
        (tmp_path / "site" / pkg / "data").mkdir(parents=True)
        (tmp_path / "site" / pkg / "__init__.py").write_text("")
        for name in names:
            (tmp_path / "site" / pkg / "data" / name).write_bytes(chunks[int(name[4:6]) - 1])
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(chunks)

    def register(sha: str) -> None:
        model = models.EmbeddedModel(
            "fake", "fake.gguf", "fakepart1..2==1", ("fakepart1", "fakepart2"), sha, False
        )
        monkeypatch.setitem(models.MODELS, "fake", model)

    yield whole, register
    sys.modules.pop("fakepart1", None)
    sys.modules.pop("fakepart2", None)


def test_split_model_is_assembled_in_order_once(split_model):
    whole, register = split_model
    register(hashlib.sha256(whole).hexdigest())
    path = models.model_path("fake")
    assert path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert models.model_path("fake").stat().st_mtime_ns == stamp  # not re-assembled


def test_tampered_chunks_fail_the_checksum_and_leave_nothing(split_model):
    _, register = split_model
    register("0" * 64)
    with pytest.raises(FreeALError, match="not the pinned ones"):
        models.model_path("fake")
    assert not list((models.cache_root() / "models").glob("fake*"))


def test_unknown_model_names_the_choices():
    with pytest.raises(FreeALError, match=r"qwen2\.5-coder-1\.5b"):
        models.resolve_model("gpt-17")

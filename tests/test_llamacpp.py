"""Label scoring on real GGUF models: SmolLM2 for plumbing, Qwen 0.5B for accuracy on a real slice."""

from __future__ import annotations

import numpy as np
import pytest

from freeal.annotate import annotate
from freeal.data import read_items
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.llamacpp import LlamaCppAnnotator
from freeal.llm.prompts import CONTENT_FREE_INPUTS, classification_prompt
from freeal.metrics import classification_report
from freeal.tasks import Task, load_task

MULTI = Task(
    name="tone",
    description="Tone of a sentence.",
    labels={"very positive": "enthusiastic", "neutral statement": "no opinion", "negative": "critical"},
)


def test_every_answer_is_a_label_with_normalized_confidence(smollm2, data_dir, tmp_path):
    task = load_task(data_dir / "trec")
    items = read_items(data_dir / "trec" / "test.jsonl", limit=12, seed=3)
    frame = annotate(task, items, CachedAnnotator(smollm2, CallCache(tmp_path / "c.sqlite")), progress=False)
    assert set(frame["label"]) <= set(task.labels)
    for probs, conf, label in zip(frame["probs"], frame["confidence"], frame["label"], strict=True):
        assert abs(sum(probs.values()) - 1) < 1e-9
        assert conf == max(probs.values()) == probs[label]


def test_multi_token_labels_sum_token_logprobs(smollm2):
    """The score of a multi-token label is the sum of its tokens' log-probabilities, each read after
    the prompt and the label's earlier tokens (checked against a step-by-step evaluation)."""
    messages = classification_prompt(MULTI, "The food was wonderful and the staff were lovely.")
    labels = MULTI.label_names
    assert any(len(smollm2.label_tokens(lab)) > 1 for lab in labels)
    answer = smollm2.score(messages, labels)
    prompt = smollm2.render(messages)
    for label, score in zip(labels, answer.scores, strict=True):
        tokens = smollm2.label_tokens(label)
        expected = 0.0
        for k, token in enumerate(tokens):
            smollm2.llm.reset()  # no reuse: evaluate the whole sequence from scratch
            logprobs, _ = smollm2._next_logprobs(prompt + tokens[:k])
            expected += logprobs[token]
        assert score == pytest.approx(expected, abs=2e-3)
    assert answer.label == labels[int(np.argmax(answer.scores))]


def test_shared_prefix_is_evaluated_once(smollm2):
    """Instructions come first, so the second item only evaluates its own tokens."""
    task = load_task_like_sst2()
    first = smollm2.score(classification_prompt(task, "A dull, lifeless film."), task.label_names)
    second = smollm2.score(classification_prompt(task, "A joyous, moving film."), task.label_names)
    assert first.prompt_tokens > 50
    assert second.evaluated_tokens < second.prompt_tokens / 3
    again = smollm2.score(classification_prompt(task, "A joyous, moving film."), task.label_names)
    assert again.scores == pytest.approx(second.scores, abs=1e-3)


def load_task_like_sst2() -> Task:
    return Task(
        name="sentiment",
        description="Sentiment of a movie review sentence.",
        labels={"negative": "a negative opinion", "positive": "a positive opinion"},
    )


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    from freeal.llm.models import resolve_model

    path, name = resolve_model("smollm2-135m")
    small = LlamaCppAnnotator(path, name=name, n_ctx=256)
    with pytest.raises(FreeALError, match="does not fit the model's context of 256"):
        small.score(classification_prompt(load_task_like_sst2(), "word " * 400), ["negative", "positive"])


@pytest.mark.slow
def test_qwen_05b_labels_a_real_slice_well_above_chance(data_dir, tmp_path):
    from freeal.llm.models import resolve_model

    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "test.jsonl", task=task, limit=80, seed=11)
    path, name = resolve_model("qwen2.5-coder-0.5b")
    annotator = CachedAnnotator(
        LlamaCppAnnotator(path, name=name, n_ctx=1024), CallCache(tmp_path / "c.sqlite")
    )
    frame = annotate(task, items, annotator, progress=False)
    report = classification_report(items.gold, frame["label"].tolist(), task.label_names)
    assert report["accuracy"] >= 0.7  # chance is 0.5; measured 0.825 on 200 items
    assert annotator.ledger.calls == 80 + len(CONTENT_FREE_INPUTS)  # auto calibration scores 3 more


def test_label_texts_from_a_plain_list(tmp_path):
    from freeal import LLMConfig, label_texts

    cfg = LLMConfig(model="smollm2-135m", n_ctx=1024, cache_path=tmp_path / "c.sqlite")
    frame = label_texts(load_task_like_sst2(), ["Loved it.", "Hated it."], cfg, progress=False)
    assert frame["id"].tolist() == ["0", "1"]
    assert set(frame["label"]) <= {"negative", "positive"}
    with pytest.raises(FreeALError, match="row 2: text is only whitespace"):
        label_texts(load_task_like_sst2(), ["ok", "  "], cfg, progress=False)

"""Label scoring on real GGUF models: SmolLM2 for plumbing, Qwen 0.5B for accuracy on a real slice."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from freeal.annotate import annotate
from freeal.data import read_items
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.llamacpp import LlamaCppAnnotator, common_prefix
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


def fresh_logprobs(annotator: LlamaCppAnnotator, tokens: list[int]) -> np.ndarray:
    """The next token's log-probabilities after ``tokens``, evaluated from scratch in the model's
    main context: the reference the batched scorer is checked against."""
    import llama_cpp

    annotator.llm.reset()
    annotator.llm.eval(tokens)
    raw = llama_cpp.llama_get_logits_ith(annotator.llm.ctx, -1)
    logits = np.ctypeslib.as_array(raw, shape=(annotator.llm.n_vocab(),)).astype(np.float64)
    return logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))


def test_multi_token_labels_sum_token_logprobs(smollm2):
    """The score of a multi-token label is the sum of its tokens' log-probabilities, each read after
    the prompt and the label's earlier tokens (checked against a step-by-step evaluation)."""
    messages = classification_prompt(MULTI, "The food was wonderful and the staff were lovely.")
    labels = MULTI.label_names
    assert sum(len(smollm2.label_tokens(lab)) > 1 for lab in labels) >= 2  # a second batch is needed
    answer = smollm2.score(messages, labels)
    prompt = smollm2.render(messages)
    for label, score in zip(labels, answer.scores, strict=True):
        tokens = smollm2.label_tokens(label)
        expected = sum(fresh_logprobs(smollm2, prompt + tokens[:k])[t] for k, t in enumerate(tokens))
        assert score == pytest.approx(expected, abs=2e-3)
    assert answer.label == labels[int(np.argmax(answer.scores))]


def real_prompts(data_dir, name: str, n: int, seed: int) -> tuple[Task, list]:
    task = load_task(data_dir / name)
    items = read_items(data_dir / name / "test.jsonl", task=task, limit=n, seed=seed)
    return task, [classification_prompt(task, t) for t in items.texts]


@pytest.mark.parametrize("name", ["sst2", "trec"])  # TREC has labels of several tokens
def test_a_text_scores_the_same_whatever_else_is_in_its_batch(smollm2, data_dir, name):
    """Texts scored in one decode are kept apart: a text's scores do not depend on its neighbours
    beyond llama.cpp's rounding. That rounding moves with how llama.cpp cuts a batch into steps
    (measured: up to 0.055 nats on this 135M model); a sequence that saw another's tokens moves by
    far more (0.17 to 0.2 nats with llama.cpp's unified KV cache, 1 nat with answers mixed up)."""
    task, candidates = real_prompts(data_dir, name, 200, seed=8)
    # texts that start with different tokens, so that every batch shares just the instructions (a
    # batch's shared prefix, and with it llama.cpp's kernels for the rest, depends on its texts)
    start = common_prefix(smollm2.render(candidates[0]), smollm2.render(candidates[1]))
    prompts, seen = [], set()
    for prompt in candidates:
        token = smollm2.render(prompt)[start]
        if token not in seen:
            seen.add(token)
            prompts.append(prompt)
    assert len(prompts) >= 9

    def scores(batch: list) -> list[list[float]]:
        found = dict(smollm2.score_many(batch, task.label_names))  # answers come in any order
        return [found[i].scores for i in range(len(batch))]

    first = scores(prompts[:5])
    assert scores([prompts[0], *prompts[5:9]])[0] == pytest.approx(first[0], abs=0.1)
    assert scores(prompts[4::-1])[::-1] == [pytest.approx(s, abs=0.1) for s in first]


@pytest.mark.parametrize("name", ["sst2", "trec"])
def test_batched_scoring_gives_the_answers_of_one_text_per_call(smollm2, data_dir, name):
    """Many texts per decode give the labels of one text per call on a real slice, with scores equal
    to llama.cpp's numerical tolerance. That tolerance is not tiny: llama.cpp computes a batch of 32
    tokens or more on top of a cached prefix with other kernels than a short one (measured: up to
    0.36 nats on this 135M model, 0.23 on the 0.5B with the one-text path of earlier versions)."""
    task, prompts = real_prompts(data_dir, name, 24, seed=9)
    found = dict(smollm2.score_many(prompts, task.label_names))
    batched = [found[i] for i in range(len(prompts))]
    single = [smollm2.score(p, task.label_names) for p in prompts]
    assert len(batched) == 24 and [a.prompt_tokens for a in batched] == [a.prompt_tokens for a in single]
    gaps = np.abs(np.array([a.scores for a in batched]) - np.array([a.scores for a in single]))
    assert np.median(gaps) < 0.1 and gaps.max() < 0.5
    for one, many in zip(single, batched, strict=True):
        ranked = sorted(one.scores, reverse=True)
        if ranked[0] - ranked[1] > 2 * gaps.max():  # not a near tie
            assert many.label == one.label
    evaluated = sum(a.evaluated_tokens for a in batched)
    assert evaluated < sum(a.prompt_tokens for a in batched) / 2  # the instructions once per batch


def test_a_run_killed_in_a_batch_pays_again_only_for_the_answers_not_stored(smollm2, data_dir, tmp_path):
    task, prompts = real_prompts(data_dir, "sst2", 20, seed=10)
    first = CachedAnnotator(smollm2, CallCache(tmp_path / "c.sqlite"))
    for n, _ in enumerate(first.score_many(prompts, task.label_names), start=1):
        if n == 7:  # the process dies here, in the middle of a batch of about 12 texts
            break
    again = CachedAnnotator(smollm2, CallCache(tmp_path / "c.sqlite"))
    answers = dict(again.score_many(prompts, task.label_names))
    assert len(answers) == 20 and again.ledger.cache_hits == 7 and again.ledger.calls == 13


def test_shared_prefix_is_evaluated_once(smollm2):
    """Instructions come first, so the second item only evaluates its own tokens."""
    task = load_task_like_sst2()
    first = smollm2.score(classification_prompt(task, "A dull, lifeless film."), task.label_names)
    second = smollm2.score(classification_prompt(task, "A joyous, moving film."), task.label_names)
    assert first.prompt_tokens > 50
    assert second.evaluated_tokens < second.prompt_tokens / 3
    again = smollm2.score(classification_prompt(task, "A joyous, moving film."), task.label_names)
    assert again.scores == pytest.approx(second.scores, abs=1e-3)


def test_greedy_answers_under_a_grammar_are_llama_cpps_own(smollm2, data_dir):
    """freeal checks the grammar on the best token first (llama-cpp-python's chain runs it over the
    whole vocabulary at every step): the answers must be the chain's, token for token, except that
    freeal's stops where a line comes for the third time, where the chain's loops on to
    ``max_tokens``. Real NER prompts and grammars, and one grammar that refuses whatever the model
    would say first, so the pass over the whole vocabulary is taken too."""
    import llama_cpp

    from freeal.data import read_sentences
    from freeal.llm.prompts import ner_prompt
    from freeal.ner import align, answer_grammar, parse_lines, render

    task = load_task(data_dir / "bc5cdr")
    sentences = read_sentences(data_dir / "bc5cdr" / "train.jsonl", task=task, limit=5, seed=3).tokens
    prompts = [ner_prompt(task, render(tokens), [], json_output=False) for tokens in sentences]
    grammars = [answer_grammar(tokens, task.label_names, 8) for tokens in sentences]
    prompts.append([{"role": "user", "content": "Say hello."}])
    grammars.append('root ::= "Zq" [0-9] [0-9]? "\\n"')
    found = list(smollm2.generate_many(prompts, max_tokens=48, temperature=0.0, seed=0, grammars=grammars))
    assert [i for i, _ in found] == list(range(len(prompts)))
    stopped = 0
    for k, ((_, answer), messages, grammar) in enumerate(zip(found, prompts, grammars, strict=True)):
        chain = smollm2.llm.create_chat_completion(
            messages=messages,
            max_tokens=48,
            temperature=0.0,
            seed=0,
            grammar=llama_cpp.LlamaGrammar.from_string(grammar, verbose=False),
        )
        text, tokens = chain["choices"][0]["message"]["content"], chain["usage"]["completion_tokens"]
        lines = text.split("\n")[:-1]
        repeat = next((j for j, line in enumerate(lines) if lines[:j].count(line) == 2), None)
        if repeat is None:
            assert (answer.text, answer.completion_tokens) == (text, tokens)
            continue
        stopped += 1
        assert answer.text == "".join(line + "\n" for line in lines[:repeat])
        assert answer.completion_tokens < tokens
        # the lines left out add no entity: the spans are those of the chain's whole answer
        whole = text[: text.rfind("\n") + 1]
        spans = [align(sentences[k], parse_lines(t, task.label_names)) for t in (answer.text, whole)]
        assert spans[0] == spans[1]
    assert found[-1][1].text.startswith("Zq")
    assert stopped >= 1


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


def test_annotators_closed_or_left_alive_at_exit_are_freed_without_an_error(tmp_path):
    """A script or notebook keeps its annotator in a global until the interpreter exits; llama.cpp's
    memory must be freed then, while llama_cpp is still whole, the scoring context before the model.
    One closed early (twice: the second close, and the exit, must do nothing) must not be freed again."""
    script = tmp_path / "keep.py"
    script.write_text(
        "from freeal.llm.llamacpp import LlamaCppAnnotator\n"
        "from freeal.llm.models import resolve_model\n"
        "path, name = resolve_model('smollm2-135m')\n"
        "ASK = [{'role': 'user', 'content': 'Yes or no?'}]\n"
        "CLOSED = LlamaCppAnnotator(path, name=name, n_ctx=512)\n"
        "CLOSED.score(ASK, ['yes', 'no'])\n"
        "CLOSED.close()\n"
        "CLOSED.close()\n"
        "KEPT = LlamaCppAnnotator(path, name=name, n_ctx=512)\n"
        "print(KEPT.score(ASK, ['yes', 'no']).label)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in {"yes", "no"}
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr, done.stderr

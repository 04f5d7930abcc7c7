"""Demonstration writing (parsing, filtering, OpenAI-compatible generation) and who sees which
demonstrations (per-item kNN or shared per group), including the tokens that sharing saves."""

from __future__ import annotations

import numpy as np
import pytest

from freeal.annotate import label_groups
from freeal.data import read_items
from freeal.demos import STYLE_WORDS, demonstration_groups, excerpt, generate_demonstrations, parse_generated
from freeal.embed import Embedder
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.openai_compat import OpenAICompatAnnotator
from freeal.tasks import load_task, task_from_dict
from openai_server import FakeOpenAIServer

TASK = task_from_dict(
    {"name": "t", "description": "Sentiment of a review.", "labels": {"good": "praise", "bad": "criticism"}}
)


def test_parse_generated_reads_numbered_and_bulleted_lists() -> None:
    answer = 'Here you go:\n1. "A fine film."\n2) Dull and long.\n- Bulleted one\n\nThanks!\n3.   \n'
    assert parse_generated(answer) == ["A fine film.", "Dull and long.", "Bulleted one"]
    # one unnumbered line is one text; unnumbered prose over several lines is not
    assert parse_generated('  "What can you get for a dollar?"\n') == ["What can you get for a dollar?"]
    assert parse_generated("A user wrote the following text:\n\nI am going to the movies.") == []
    assert parse_generated("Sorry, I cannot do that.\n1.   \n") == []


def test_generated_copies_duplicates_and_cross_label_repeats_are_dropped(tmp_path, scripted_writer) -> None:
    style = ["the movie was a total waste of my evening", "simply a joy from start to finish"]
    answers = [
        # round 1, good: a near copy of a style text (one word changed), a keeper, a duplicate of it
        "1. The movie was a total waste of my night\n2. Wonderful acting.\n3. wonderful acting!",
        # round 1, bad: one repeats the text just kept for 'good'
        "1. Wonderful acting.\n2. Boring.",
        # round 2, good and bad
        "1. A triumph.\n2. Moving and funny.",
        "1. Awful script.\n2. Painful to sit through.",
    ]
    backend = scripted_writer(answers)
    ann = CachedAnnotator(backend, CallCache(tmp_path / "c.sqlite"))
    demos, report = generate_demonstrations(TASK, ann, style, per_label=3, per_call=2, seed=1)
    assert [d for d in demos if d[1] == "good"] == [
        ("Wonderful acting.", "good"),
        ("A triumph.", "good"),
        ("Moving and funny.", "good"),
    ]
    assert [d for d in demos if d[1] == "bad"] == [
        ("Boring.", "bad"),
        ("Awful script.", "bad"),
        ("Painful to sit through.", "bad"),
    ]
    assert report.dropped_copies == 1 and report.dropped_duplicates == 2 and report.calls == 4
    assert backend.requests == [2, 2]  # each round's calls, one per label, go out together


def test_a_label_that_met_its_quota_is_not_asked_again(tmp_path, scripted_writer) -> None:
    answers = ["1. Great.\n2. Superb.", "1. Bad.", "1. Poor."]
    backend = scripted_writer(answers)
    ann = CachedAnnotator(backend, CallCache(tmp_path / "c.sqlite"))
    demos, report = generate_demonstrations(TASK, ann, ["some text"], per_label=2, per_call=2, seed=0)
    assert backend.requests == [2, 1] and report.calls == 3
    assert demos == [("Great.", "good"), ("Superb.", "good"), ("Bad.", "bad"), ("Poor.", "bad")]


def test_what_a_label_is_asked_does_not_depend_on_the_other_labels_calls(tmp_path, scripted_writer) -> None:
    """A label's calls show the same style texts under the same token budget whether the other label
    was done after one round or still asked: each label draws from a stream of its own, so the
    order calls go out in (and the answers cached by earlier runs) does not change what is asked."""
    style = [" ".join(["word"] * n) + f" number {n}." for n in range(3, 30, 2)]
    asked = {}
    for good_rounds in (1, 3):
        answers = []
        for r in range(3):  # good writes its 3 texts in `good_rounds` rounds, bad one per round
            if r < good_rounds:
                answers.append("\n".join(f"{k + 1}. Good {r} {k}." for k in range(3 // good_rounds)))
            answers.append(f"1. Bad {r}.")
        backend = scripted_writer(answers)
        ann = CachedAnnotator(backend, CallCache(tmp_path / f"c{good_rounds}.sqlite"))
        generate_demonstrations(TASK, ann, style, per_label=3, per_call=2, seed=4)
        asked[good_rounds] = [(c, t) for c, t in backend.asked if 'Label "bad"' in c]
    assert len(asked[1]) == len(asked[3]) == 3 and asked[1] == asked[3]
    assert len({c for c, _ in asked[1]}) == 3  # three different draws, not one repeated


class Judge:
    """A check that labels a text as intended unless it holds "meh", and gives every text the score
    set for it (default 0.5); it keeps the texts it was asked about, call by call."""

    def __init__(self, scores: dict[str, float] | None = None) -> None:
        self.scores = scores or {}
        self.seen: list[list[str]] = []

    def __call__(self, demos):  # type: ignore[no-untyped-def]
        self.seen.append([t for t, _ in demos])
        return [("meh" not in t.lower(), self.scores.get(t, 0.5)) for t, _ in demos]


def test_a_checked_label_is_written_until_texts_labeled_as_intended_fill_its_quota(
    tmp_path, scripted_writer
) -> None:
    """Only texts the check accepts count: a label whose texts it rejects is asked again, for the
    missing count only, and one whose quota is met is not (issue 13: stop once verified texts
    suffice)."""
    answers = ["1. Great.\n2. Meh, fine I guess.", "1. Bad.\n2. Poor.", "1. Superb."]
    backend = scripted_writer(answers)
    judge = Judge()
    ann = CachedAnnotator(backend, CallCache(tmp_path / "c.sqlite"))
    demos, report = generate_demonstrations(TASK, ann, ["some text"], per_label=2, per_call=2, check=judge)
    assert backend.requests == [2, 1]
    assert "Write 1 new" in backend.asked[2][0] and 'Label "good"' in backend.asked[2][0]
    assert demos == [("Great.", "good"), ("Superb.", "good"), ("Bad.", "bad"), ("Poor.", "bad")]
    assert (report.candidates, report.kept, report.verified, report.rejected) == (5, 4, 4, 1)
    # every candidate so far, each round: auto calibration is decided over all of them together
    assert judge.seen == [["Great.", "Meh, fine I guess.", "Bad.", "Poor."], [*judge.seen[0], "Superb."]]


def test_a_label_the_check_rejects_keeps_its_best_scored_texts_to_appear_at_all(
    tmp_path, scripted_writer
) -> None:
    answers = ["1. Great.\n2. Superb.", "1. Meh one.\n2. Meh two.", "1. Meh three.\n2. Meh four."]
    judge = Judge({"Meh one.": 0.1, "Meh two.": 0.2, "Meh three.": 0.4, "Meh four.": 0.3})
    ann = CachedAnnotator(scripted_writer(answers), CallCache(tmp_path / "c.sqlite"))
    demos, report = generate_demonstrations(
        TASK, ann, ["some text"], per_label=2, per_call=2, max_calls_per_label=2, check=judge, min_per_label=2
    )
    assert [t for t, label in demos if label == "bad"] == ["Meh three.", "Meh four."]
    assert (report.calls, report.kept, report.verified, report.rejected) == (3, 4, 2, 4)


def test_an_excerpt_keeps_the_first_sentence_or_two_within_the_word_budget() -> None:
    assert excerpt("Short one. Another short one. A third.") == "Short one. Another short one."
    long_first = " ".join(["word"] * 60) + ". Next."
    assert excerpt(long_first) == " ".join(["word"] * STYLE_WORDS) + " …"
    assert excerpt("One sentence of five words.", words=3) == "One sentence of …"


def test_long_style_texts_are_cut_and_bound_what_the_llm_may_write(tmp_path, scripted_writer) -> None:
    """An abstract shown as style would make the LLM write abstracts: the prompt shows its first
    sentences only, asks for texts as short, and the token budget follows (issue 13)."""
    sentence = "Patients treated with the drug showed marked improvement over twelve weeks of care."
    abstract = " ".join([sentence] * 12)  # ~160 words
    backend = scripted_writer(["1. Fine.\n2. Good.", "1. Bad.\n2. Poor."])
    ann = CachedAnnotator(backend, CallCache(tmp_path / "c.sqlite"))
    generate_demonstrations(TASK, ann, [abstract], per_label=2, per_call=2, seed=0)
    for content, max_tokens in backend.asked:
        assert abstract not in content and f"- {sentence} {sentence}\n" in content
        assert "Each text at most 26 words." in content
        assert max_tokens == 2 * (2 * 26 + 16)


def test_a_label_without_any_usable_demonstration_is_an_error(tmp_path, scripted_writer) -> None:
    answers = ["1. Great.", "Sorry, I cannot do that.\nI only write positive texts.", ""]
    ann = CachedAnnotator(scripted_writer(answers), CallCache(tmp_path / "c.sqlite"))
    with pytest.raises(FreeALError, match="'bad'"):
        generate_demonstrations(TASK, ann, ["some text"], per_label=1, per_call=1)


def test_generation_through_an_openai_compatible_server() -> None:
    with FakeOpenAIServer(policy=lambda users: "1. Lovely.\n2. Superb.") as server:
        ann = OpenAICompatAnnotator("m", server.url, backoff_base=0.01)
        out = dict(
            ann.generate_many(
                [[{"role": "user", "content": "write"}]], max_tokens=50, temperature=0.7, seed=3
            )
        )
    assert parse_generated(out[0].text) == ["Lovely.", "Superb."]
    body = server.bodies[0]
    assert body["max_tokens"] == 50 and body["temperature"] == 0.7 and body["seed"] == 3
    assert "logprobs" not in body and "top_logprobs" not in body


def test_a_served_model_answers_a_rounds_calls_together(tmp_path) -> None:
    """Each label's call of a round is in flight at the same time, not one after another."""
    numbers = iter(range(1000))

    def write(users: list[str]) -> str:
        return f"1. Written text {next(numbers)}.\n2. Written text {next(numbers)}."

    with FakeOpenAIServer(policy=write, latency=0.3) as server:
        ann = CachedAnnotator(OpenAICompatAnnotator("m", server.url), CallCache(tmp_path / "c.sqlite"))
        demos, report = generate_demonstrations(TASK, ann, ["a style text"], per_label=4, per_call=2)
    assert len(demos) == 8 and report.calls == server.requests == 4
    assert server.max_in_flight == 2  # both labels at once, in each of the two rounds


def _unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_per_item_groups_are_each_items_balanced_nearest() -> None:
    rng = np.random.default_rng(0)
    items, demos = _unit(rng, 7), _unit(rng, 12)
    labels = ["a", "b", "c"] * 4
    groups = demonstration_groups(items, demos, labels, k=6, group_size=None)
    assert [m.tolist() for m, _ in groups] == [[i] for i in range(7)]
    for (_, picked), vec in zip(groups, items, strict=True):
        assert len(picked) == 6 and sorted(labels[j] for j in picked) == ["a", "a", "b", "b", "c", "c"]
        sims = demos[picked] @ vec
        assert list(sims) == sorted(sims)  # most similar last
        for label in "abc":  # each class's two are its two nearest
            mine = [j for j in range(12) if labels[j] == label]
            best = sorted(mine, key=lambda j: -(demos[j] @ vec))[:2]
            assert {j for j in picked if labels[j] == label} == set(best)


def test_shared_groups_partition_the_items() -> None:
    rng = np.random.default_rng(1)
    items, demos = _unit(rng, 50), _unit(rng, 10)
    groups = demonstration_groups(items, demos, ["x", "y"] * 5, k=4, group_size=10, seed=0)
    assert len(groups) == 5
    assert sorted(i for m, _ in groups for i in m) == list(range(50))
    assert all(len(p) == 4 for _, p in groups)
    again = demonstration_groups(items, demos, ["x", "y"] * 5, k=4, group_size=10, seed=0)
    assert [(m.tolist(), p) for m, p in groups] == [(m.tolist(), p) for m, p in again]


def test_shared_demonstrations_evaluate_far_fewer_tokens(data_dir, smollm2, tmp_path) -> None:
    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "train.jsonl", task=task, limit=24, seed=2)
    pool = read_items(data_dir / "sst2" / "dev.jsonl", task=task, limit=12, seed=2)
    demos = list(zip(pool.texts, pool.gold, strict=True))
    embed = Embedder(device="cpu")
    vectors, demo_vectors = embed.encode(items.texts), embed.encode(pool.texts)
    per_token = {}
    for name, size in (("item", None), ("shared", 12)):
        found = demonstration_groups(vectors, demo_vectors, pool.gold, k=6, group_size=size)
        groups = [(m, [demos[j] for j in p]) for m, p in found]
        ann = CachedAnnotator(smollm2, CallCache(tmp_path / f"{name}.sqlite"))
        frame = label_groups(task, items.texts, ann, groups, calibrate="off", progress=False)
        assert frame["asked"].all() and frame["label"].notna().all()
        per_token[name] = ann.ledger.evaluated_tokens / len(items)
    assert per_token["shared"] < 0.4 * per_token["item"]

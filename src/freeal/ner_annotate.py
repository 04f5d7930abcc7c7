"""The LLM's side of NER: entity lists for sentences, and demonstration sentences it writes itself.

Prompts are grouped like classification prompts (a group shares its demonstrations, so llama.cpp
evaluates them once per group). On llama.cpp each answer is constrained by the sentence's grammar
(:func:`freeal.ner.answer_grammar`) and always parses; on other backends the answer is JSON, parsed
strictly, and asked again once with the parse error when it does not parse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from freeal.demos import is_copy, normal_form, style_draws
from freeal.errors import FreeALError
from freeal.llm.base import Generation, Message
from freeal.llm.cache import CachedAnnotator
from freeal.llm.prompts import ner_generation_prompt, ner_prompt
from freeal.ner import (
    END,
    Span,
    align,
    answer_grammar,
    demo_grammar,
    format_answer,
    parse_json,
    parse_lines,
    render,
    tokenize,
)
from freeal.progress import progress_bar
from freeal.tasks import Task

#: A demonstration: a sentence's tokens and its entity spans.
Demo = tuple[list[str], list[Span]]


def _demo_pairs(demos: Sequence[Demo], json_output: bool) -> list[tuple[str, str]]:
    pairs = []
    for tokens, spans in demos:
        if json_output:
            answer = json.dumps(
                [{"type": k, "text": render(tokens[a:b])} for k, a, b in spans], ensure_ascii=False
            )
        else:
            answer = format_answer(tokens, spans)
        pairs.append((render(tokens), answer))
    return pairs


@dataclass
class SpanAnswers:
    """Per sentence: its spans (``None`` where no answer could be read), and what was dropped."""

    spans: list[list[Span] | None]
    mentions: int = 0
    unaligned: int = 0
    unreadable: int = 0
    reasked: int = 0
    truncated: int = 0

    def stats(self) -> dict:
        out = asdict(self)
        del out["spans"]
        return out


def annotate_sentences(
    task: Task,
    sentences: Sequence[Sequence[str]],
    annotator: CachedAnnotator,
    groups: Sequence[tuple[np.ndarray, Sequence[Demo]]],
    *,
    max_mention_tokens: int = 8,
    max_tokens: int = 160,
    progress: bool = True,
    description: str = "entities",
) -> SpanAnswers:
    """Entities of every sentence named in ``groups`` (others get ``None``), each group's sentences
    prompted with that group's demonstrations."""
    grammar = annotator.supports_grammar
    order = [int(i) for members, _ in groups for i in members]
    prompts: list[list[Message]] = []
    for members, demos in groups:
        pairs = _demo_pairs(demos, json_output=not grammar)
        prompts.extend(
            ner_prompt(task, render(sentences[int(i)]), pairs, json_output=not grammar) for i in members
        )
    out = SpanAnswers(spans=[None] * len(sentences))
    answers: dict[int, Generation] = {}
    grammars = (
        [answer_grammar(sentences[i], task.label_names, max_mention_tokens) for i in order]
        if grammar
        else None
    )
    stream = annotator.generate_many(
        prompts, max_tokens=max_tokens, temperature=0.0, seed=0, grammars=grammars
    )
    for j, answer in progress_bar(stream, len(prompts), description, progress):
        answers[j] = answer
    retry: list[tuple[int, str]] = []
    for j, answer in answers.items():
        text = answer.text
        if grammar and not text.rstrip().endswith(END):
            # cut off by max_tokens, or where a greedy answer began to repeat its lines (a small model
            # can list entities until it runs out): every complete line is valid under the grammar,
            # so keep those and drop the partial one
            out.truncated += 1
            text = text[: text.rfind("\n") + 1]
        try:
            mentions = (parse_lines if grammar else parse_json)(text, task.label_names)
        except ValueError as exc:
            retry.append((j, str(exc)))
            continue
        _store(out, order[j], mentions, sentences[order[j]])
    if retry:  # one re-ask, with the reason the first answer could not be read
        again: list[list[Message]] = [
            [
                *prompts[j],
                {"role": "assistant", "content": answers[j].text},
                {
                    "role": "user",
                    "content": f"That answer could not be read: {why}. Answer again with only the JSON list.",
                },
            ]
            for j, why in retry
        ]
        out.reasked = len(again)
        for k, answer in annotator.generate_many(again, max_tokens=max_tokens, temperature=0.0, seed=0):
            try:
                mentions = parse_json(answer.text, task.label_names)
            except ValueError:
                out.unreadable += 1
                continue
            _store(out, order[retry[k][0]], mentions, sentences[order[retry[k][0]]])
    return out


def _store(out: SpanAnswers, i: int, mentions: list[tuple[str, str]], tokens: Sequence[str]) -> None:
    spans, missed = align(tokens, mentions)
    out.spans[i] = spans
    out.mentions += len(mentions)
    out.unaligned += missed


@dataclass
class DemoReport:
    """What demonstration writing produced and dropped (duplicates, copies, unreadable blocks), and
    the entities a check added (``spans_added_by_check``)."""

    calls: int = 0
    written: int = 0
    kept: int = 0
    unreadable: int = 0
    unaligned: int = 0
    copies: int = 0
    duplicates: int = 0
    per_type: dict[str, int] = field(default_factory=dict)
    spans_added_by_check: int | None = None


#: a check of written sentences: each sentence's entity list once the LLM has also annotated it
#: zero-shot (the written spans and what the zero-shot pass found beside them)
SpanCheck = Callable[[Sequence[Demo]], list[list[Span]]]


def parse_demo_blocks(answer: str, types: Sequence[str]) -> tuple[list[Demo], int, int]:
    """``Sentence: ...`` blocks with their ``Type: mention`` lines; returns (demonstrations,
    unreadable blocks, blocks with a mention not in the sentence). A block is kept only when every
    line parses and every mention aligns, so a written demonstration never carries a guessed span."""
    demos: list[Demo] = []
    unreadable = unaligned = 0
    blocks = [b for b in answer.split("Sentence:")[1:] if b.strip()]
    for block in blocks:
        first, _, rest = block.strip().partition("\n")
        tokens = tokenize(first.strip().lstrip("0123456789.) "))
        body = rest.split(END)[0]
        try:
            mentions = parse_lines(body, types)
        except ValueError:
            unreadable += 1
            continue
        spans, missed = align(tokens, mentions)
        if not tokens or missed or not spans:
            unaligned += 1
            continue
        demos.append((tokens, spans))
    return demos, unreadable, unaligned


def _sentences_per_type(demos: Sequence[Demo], types: Sequence[str]) -> dict[str, int]:
    return {kind: sum(any(k == kind for k, _, _ in spans) for _, spans in demos) for kind in types}


def generate_ner_demonstrations(
    task: Task,
    annotator: CachedAnnotator,
    style_sentences: Sequence[Sequence[str]],
    *,
    per_type: int = 16,
    per_call: int = 4,
    style_examples: int = 3,
    temperature: float = 0.8,
    max_calls_per_type: int | None = None,
    seed: int = 0,
    check: SpanCheck | None = None,
) -> tuple[list[Demo], DemoReport]:
    """Sentences with entities, written by the LLM: about ``per_type`` mentioning each type.

    Each call shows ``style_examples`` unlabeled sentences and asks for ``per_call`` sentences
    mentioning one type (fewer when the type needs fewer); a kept sentence counts for every type it
    mentions. Calls go out in rounds, one for each type still short, all in one request (a served
    model answers them concurrently); each type draws its style sentences from a stream of its own
    (:func:`freeal.demos.style_draws`), so what a call asks does not depend on the order calls go
    out in. With a ``check`` the sentences kept so far are checked after every round and counted
    by their checked entity lists: a writer asked for one type tends to list only that type, so a
    sentence the check finds the other type in counts for it too, and that type stops being asked
    once such sentences suffice. A type that ends with no sentence is an error (the initial round
    would never show it).
    """
    if not style_sentences:
        raise FreeALError("demonstration writing needs at least one unlabeled sentence to show as style")
    budget = max_calls_per_type or 2 * math.ceil(per_type / per_call)
    draws = style_draws(task.label_names, len(style_sentences), style_examples, budget, seed)
    report = DemoReport()
    kept: list[Demo] = []
    added = 0  # entities the check found beside the written ones
    seen: set[str] = set()
    for attempt in range(budget):
        report.per_type = _sentences_per_type(kept, task.label_names)
        need = {kind: per_type - n for kind, n in report.per_type.items() if n < per_type}
        if not need:
            break
        shown = [[render(style_sentences[int(i)]) for i in draws[kind][attempt]] for kind in need]
        asked = [min(per_call, n) for n in need.values()]
        prompts = [
            ner_generation_prompt(task, kind, examples, n)
            for kind, examples, n in zip(need, shown, asked, strict=True)
        ]
        answers = dict(
            annotator.generate_many(
                prompts,
                max_tokens=100 * per_call,
                temperature=temperature,
                seed=seed + attempt,
                grammars=[demo_grammar(task.label_names, n) for n in asked]
                if annotator.supports_grammar
                else None,
            )
        )
        report.calls += len(prompts)
        before = len(kept)
        for j in range(len(need)):  # in type order, whatever order the answers came in
            demos, unreadable, unaligned = parse_demo_blocks(answers[j].text, task.label_names)
            report.written += len(demos) + unreadable + unaligned
            report.unreadable += unreadable
            report.unaligned += unaligned
            shown_norm = [normal_form(t) for t in shown[j]]
            for tokens, spans in demos:
                norm = normal_form(render(tokens))
                if is_copy(norm, shown_norm):
                    report.copies += 1
                elif norm in seen:
                    report.duplicates += 1
                else:
                    seen.add(norm)
                    kept.append((tokens, spans))
        if check:  # the round's new sentences; earlier ones were checked in their round
            new = kept[before:]
            checked = check(new) if new else []
            added += sum(len(c) - len(s) for c, (_, s) in zip(checked, new, strict=True))
            kept[before:] = [(t, c) for (t, _), c in zip(new, checked, strict=True)]
    report.per_type = _sentences_per_type(kept, task.label_names)
    if check:
        report.spans_added_by_check = added
    for kind, count in report.per_type.items():
        if count == 0:
            raise FreeALError(
                f"the LLM wrote no usable demonstration sentence for entity type {kind!r} in {budget} "
                "calls; describe the type more concretely in the task, or use a stronger model"
            )
    report.kept = len(kept)
    return kept, report

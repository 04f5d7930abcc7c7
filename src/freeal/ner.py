"""Named-entity recognition: tokens and IOB2 tags, the LLM's entity lists, and their alignment.

Everything here is plain functions on token lists, so the loop, the tagger and the tests share one
definition of a span: ``(type, start, end)`` over token positions, ``end`` exclusive.

Raw text is split by :func:`tokenize`, the *word/punctuation tokenizer*: runs of word characters
(``\\w+``) and every other non-space character on its own, so ``"L-dopa (5 mg)"`` becomes
``L - dopa ( 5 mg )`` as in the BC5CDR/PubTator files. A sentence is shown to the LLM as its
tokens joined by single spaces, so a mention the LLM copies from the prompt is a token sequence.

The LLM answers one entity a line, ``Type: mention``, and ``END`` after the last. On llama.cpp a
grammar built per sentence (:func:`answer_grammar`) allows only the task's types and mentions that
are token sequences of the sentence, so every answer parses and aligns. Other backends answer JSON,
parsed strictly (:func:`parse_json`); mentions are aligned back to tokens by :func:`align`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import numpy as np

from freeal.errors import FreeALError

Span = tuple[str, int, int]

_TOKEN = re.compile(r"\w+|[^\w\s]")
END = "END"


def tokenize(text: str) -> list[str]:
    """The word/punctuation tokenizer (see the module docstring)."""
    return _TOKEN.findall(text)


def render(tokens: Sequence[str]) -> str:
    return " ".join(tokens)


# -- tags and spans -------------------------------------------------------------------------------


def tag_names(types: Sequence[str]) -> list[str]:
    """The IOB2 tag set: ``O`` then ``B-``/``I-`` per type, in the task's type order."""
    return ["O", *(f"{p}-{t}" for t in types for p in ("B", "I"))]


def check_tags(tags: Sequence[str], types: Sequence[str], where: str) -> None:
    """Raise one clear error for a tag that is not IOB2 over ``types`` (unknown type, ``I-`` that
    does not continue an entity of its type)."""
    known = set(types)
    previous = "O"
    for k, tag in enumerate(tags):
        if tag != "O":
            prefix, _, kind = tag.partition("-")
            if prefix not in ("B", "I") or not kind:
                raise FreeALError(f"{where}: token {k + 1}: tag {tag!r} is not IOB2 (O, B-type, I-type)")
            if kind not in known:
                raise FreeALError(
                    f"{where}: token {k + 1}: unknown entity type {kind!r} in {tag!r}; "
                    f"the task's types are {', '.join(types)}"
                )
            if prefix == "I" and previous[2:] != kind:
                raise FreeALError(
                    f"{where}: token {k + 1}: {tag!r} does not continue a {kind} entity "
                    f"(previous tag {previous!r}); IOB2 starts every entity with B-"
                )
        previous = tag


def spans_from_tags(tags: Sequence[str]) -> list[Span]:
    """Entities of valid IOB2 tags, in order."""
    spans: list[Span] = []
    start, kind = -1, ""
    for k, tag in enumerate([*tags, "O"]):
        if start >= 0 and not (tag.startswith("I-") and tag[2:] == kind):
            spans.append((kind, start, k))
            start = -1
        if tag.startswith("B-"):
            start, kind = k, tag[2:]
    return spans


def check_tag_rows(
    sentences: Sequence[Sequence[str]], tags: Sequence[Sequence[str] | None], names: Sequence[str]
) -> None:
    """One clear error for training data a tagger cannot take: a row of tags (``None``: no
    annotation) of another length than its sentence, or a tag outside ``names``."""
    if len(sentences) != len(tags):
        raise FreeALError("sentences and tags must have the same length")
    for k, (sentence, row) in enumerate(zip(sentences, tags, strict=True)):
        if row is None:
            continue
        if len(row) != len(sentence):
            raise FreeALError(f"sentence {k + 1}: {len(sentence)} tokens but {len(row)} tags")
        bad = next((t for t in row if t not in names), None)
        if bad is not None:
            raise FreeALError(f"sentence {k + 1}: tag {bad!r} is not one of {', '.join(names)}")


def repair_tags(tags: Sequence[str]) -> list[str]:
    """A tagger's per-word choices made valid IOB2: an ``I-`` that continues nothing becomes ``B-``."""
    out: list[str] = []
    previous = "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        previous = tag
    return out


def tag_signatures(rows: Sequence[Sequence[str]]) -> np.ndarray:
    """Per sentence, the types its tags hold (``Chemical+Disease``, ``none``): the groups a tagger's
    clean/noisy mixture is fitted in, since a sentence without entities has a tiny loss and one
    mixture over all would call nearly every sentence with an entity noisy."""
    return np.asarray(["+".join(sorted({t[2:] for t in row if t != "O"})) or "none" for row in rows])


def tags_from_spans(n: int, spans: Sequence[Span]) -> list[str]:
    tags = ["O"] * n
    for kind, start, end in spans:
        tags[start] = f"B-{kind}"
        for k in range(start + 1, end):
            tags[k] = f"I-{kind}"
    return tags


def entity_rows(tokens: Sequence[str], spans: Sequence[Span]) -> list[dict]:
    """A sentence's spans as ``labels.jsonl`` lists them: type, token start and end, and the text."""
    return [{"type": k, "start": a, "end": b, "text": render(tokens[a:b])} for k, a, b in spans]


def tag_agreement(tags: Sequence[str] | None, other: Sequence[str] | None) -> float | None:
    """The share of tokens on which two tag lists of a sentence agree (``None`` if one is missing)."""
    if tags is None or other is None:
        return None
    return sum(a == b for a, b in zip(tags, other, strict=True)) / len(tags)


# -- the LLM's answers ----------------------------------------------------------------------------


def parse_lines(answer: str, types: Sequence[str]) -> list[tuple[str, str]]:
    """``Type: mention`` lines up to ``END``; raises ValueError on any other line."""
    out = []
    for line in answer.strip().splitlines():
        line = line.strip()
        if not line:
            continue
        if line == END:
            break
        kind, sep, mention = line.partition(":")
        if not sep or kind.strip() not in types or not mention.strip():
            raise ValueError(f"not a 'Type: mention' line with a type of {', '.join(types)}: {line!r}")
        out.append((kind.strip(), mention.strip()))
    return out


def parse_json(answer: str, types: Sequence[str]) -> list[tuple[str, str]]:
    """A JSON list of ``{"type": ..., "text": ...}`` (code fences allowed); raises ValueError."""
    body = answer.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from exc
    if isinstance(raw, dict) and isinstance(raw.get("entities"), list):
        raw = raw["entities"]
    if not isinstance(raw, list):
        raise ValueError("expected a JSON list of entities")
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise ValueError(f"an entity must be an object with 'type' and 'text': {entry!r}")
        if entry.get("type") not in types:
            raise ValueError(f"unknown entity type {entry.get('type')!r}; use one of {', '.join(types)}")
        out.append((entry["type"], entry["text"]))
    return out


def align(tokens: Sequence[str], mentions: Sequence[tuple[str, str]]) -> tuple[list[Span], int]:
    """Spans for the mentions: every occurrence of the mention's tokens in the sentence, exact,
    else ignoring case. Returns the spans (overlaps resolved: longer first, then earlier) and how
    many mentions matched nowhere; those are dropped, never guessed."""
    lowered = [t.lower() for t in tokens]
    found: list[Span] = []
    unaligned = 0
    for kind, text in mentions:
        target = tokenize(text)
        n = len(target)
        hits = [k for k in range(len(tokens) - n + 1) if n and list(tokens[k : k + n]) == target]
        if not hits:
            low = [t.lower() for t in target]
            hits = [k for k in range(len(tokens) - n + 1) if n and lowered[k : k + n] == low]
        if not hits:
            unaligned += 1
        found.extend((kind, k, k + n) for k in hits)
    taken = [False] * len(tokens)
    spans: list[Span] = []
    for kind, start, end in sorted(dict.fromkeys(found), key=lambda s: (s[1] - s[2], s[1])):
        if not any(taken[start:end]):
            spans.append((kind, start, end))
            for k in range(start, end):
                taken[k] = True
    return sorted(spans, key=lambda s: s[1]), unaligned


def format_answer(tokens: Sequence[str], spans: Sequence[Span]) -> str:
    """Spans written the way the LLM is asked to answer (for demonstrations)."""
    lines = [f"{kind}: {render(tokens[start:end])}" for kind, start, end in spans]
    return "\n".join([*lines, END])


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def demo_grammar(types: Sequence[str], n: int) -> str:
    """GBNF for ``n`` written demonstrations: ``Sentence:`` lines, each followed by at least one
    ``Type: mention`` line with a type of ``types`` and ``END`` (mentions are checked by
    :func:`align` afterwards)."""
    kinds = " | ".join(_literal(t) for t in types)
    return (
        f"root ::= block{{{n}}}\n"
        f'block ::= "Sentence: " text "\\n" entity+ "{END}\\n"\n'
        'entity ::= type ": " text "\\n"\n'
        f"type ::= {kinds}\n"
        "text ::= [^\\n]{1,300}\n"
    )


def answer_grammar(tokens: Sequence[str], types: Sequence[str], max_mention_tokens: int = 8) -> str:
    """GBNF allowing ``Type: mention`` lines then ``END``, where a type is one of ``types`` and a
    mention is a run of at most ``max_mention_tokens`` tokens of this sentence."""
    grams = sorted(
        {
            render(tokens[i:j])
            for i in range(len(tokens))
            for j in range(i + 1, min(len(tokens), i + max_mention_tokens) + 1)
        }
    )
    mention = " | ".join(_literal(g) for g in grams) if grams else '"-"'
    kinds = " | ".join(_literal(t) for t in types)
    return (
        f'root ::= entity* "{END}"\n'
        'entity ::= type ": " mention "\\n"\n'
        f"type ::= {kinds}\n"
        f"mention ::= {mention}\n"
    )

"""Issue 13: NER by scoring candidate spans instead of generating entity lists, timed beside it.

For random BC5CDR train sentences, zero-shot, the embedded 1.5B, fresh caches, one process:

- ``generate``: freeal's NER path (:func:`freeal.ner_annotate.annotate_sentences`: the model lists
  ``Type: mention`` lines under the sentence's grammar).
- ``spans``: every word n-gram of up to ``--max-words`` words that neither starts nor ends with a
  stop word or punctuation is a candidate; each is asked as a classification, "Chemical", "Disease"
  or "none", by freeal's batched label scoring (:func:`freeal.annotate.label_groups`), the sentence
  before the mention, so a sentence's candidates share their prompt up to the mention and llama.cpp
  evaluates only the mention's tokens per candidate. A candidate is an entity when its best label
  is a type; overlapping entities keep the more confident.

Gold tags are read only to score (entity F1, seqeval). Times and tokens are the ledger's.

    python bench/ner_span_scoring.py --limit 30 --out bench/results/ner_span_scoring.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from freeal.annotate import label_groups
from freeal.config import LLMConfig
from freeal.data import read_sentences
from freeal.llm import make_annotator
from freeal.llm.native import cpu_name
from freeal.metrics import ner_report
from freeal.ner import Span, render, tags_from_spans
from freeal.ner_annotate import annotate_sentences
from freeal.tasks import load_task, task_from_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def candidates(tokens: list[str], max_words: int) -> list[tuple[int, int]]:
    """Word n-grams that neither start nor end with a stop word or a punctuation token."""

    def edge(word: str) -> bool:
        return word.lower() in ENGLISH_STOP_WORDS or not any(c.isalnum() for c in word)

    return [
        (a, b)
        for a in range(len(tokens))
        for b in range(a + 1, min(len(tokens), a + max_words) + 1)
        if not edge(tokens[a]) and not edge(tokens[b - 1])
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-words", type=int, default=4)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = load_task(DATA / "bc5cdr")
    data = read_sentences(DATA / "bc5cdr" / "train.jsonl", task=task, limit=args.limit, seed=args.seed)
    types = list(task.label_names)
    span_task = task_from_dict(
        {
            "name": "bc5cdr-mention",
            "description": "Whether a marked phrase of a biomedical sentence is a whole mention of an "
            "entity, and of which type.",
            "labels": {
                **{k: f"the phrase is exactly {task.labels[k]}" for k in types},
                "none": "the phrase is not such a mention, or only part of one, or more than one",
            },
        }
    )
    results: dict = {"machine": cpu_name(), "model": args.model, "sentences": len(data), "seed": args.seed}
    with tempfile.TemporaryDirectory() as scratch:
        annotator = make_annotator(LLMConfig(model=args.model, cache_path=Path(scratch) / "g.sqlite"))
        start = time.perf_counter()
        found = annotate_sentences(task, data.tokens, annotator, [(range(len(data)), [])], progress=False)  # type: ignore[list-item]
        seconds = time.perf_counter() - start
        generated = [tags_from_spans(len(t), s or []) for t, s in zip(data.tokens, found.spans, strict=True)]
        results["generate"] = {
            "seconds": seconds,
            "seconds_per_sentence": seconds / len(data),
            "evaluated_tokens": annotator.ledger.evaluated_tokens,
            "completion_tokens": annotator.ledger.completion_tokens,
            **{
                k: v
                for k, v in ner_report(data.gold, generated).items()
                if k in ("precision", "recall", "f1")
            },
        }
        annotator = make_annotator(LLMConfig(model=args.model, cache_path=Path(scratch) / "s.sqlite"))
        where = [(i, a, b) for i, t in enumerate(data.tokens) for a, b in candidates(t, args.max_words)]
        texts = [
            f"Sentence: {render(data.tokens[i])}\nPhrase: {render(data.tokens[i][a:b])}" for i, a, b in where
        ]
        start = time.perf_counter()
        # a group per sentence: its candidates go to the model together, sharing their prompt up to
        # the phrase. Calibration off: its content-free inputs, asked at the head of every group,
        # share only the instructions with the candidates, so llama.cpp would evaluate each
        # candidate's whole sentence again (with `auto`, measured: 45.6 tokens per candidate, 19 s
        # per sentence, and `auto` then chose no calibration, so the same answers)
        first = {}
        for j, (i, _, _) in enumerate(where):
            first.setdefault(i, []).append(j)
        groups = [(members, []) for members in first.values()]
        frame = label_groups(span_task, texts, annotator, groups, calibrate="off", progress=False)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        chosen: list[list[tuple[float, Span]]] = [[] for _ in data.tokens]
        for (i, a, b), label, confidence in zip(where, frame["label"], frame["confidence"], strict=True):
            if label in types:
                chosen[i].append((float(confidence), (label, a, b)))
        scored = []
        for i, options in enumerate(chosen):
            taken: set[int] = set()
            spans: list[Span] = []
            for _, (kind, a, b) in sorted(options, key=lambda o: (-o[0], o[1][1])):
                if not taken & set(range(a, b)):
                    spans.append((kind, a, b))
                    taken |= set(range(a, b))
            scored.append(tags_from_spans(len(data.tokens[i]), spans))
        results["spans"] = {
            "seconds": seconds,
            "seconds_per_sentence": seconds / len(data),
            "candidates": len(where),
            "candidates_per_sentence": len(where) / len(data),
            "evaluated_tokens": annotator.ledger.evaluated_tokens,
            **{k: v for k, v in ner_report(data.gold, scored).items() if k in ("precision", "recall", "f1")},
        }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()

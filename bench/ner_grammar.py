"""Issue 13: what the per-sentence grammar costs NER generation on llama.cpp, and what it buys.

The same zero-shot NER prompts (random BC5CDR train sentences), generated three ways with fresh
caches, one after another in one process: ``ngrams`` (today's grammar: ``Type: mention`` lines where
a mention is one of the sentence's own n-grams), ``lines`` (the same line format, a mention any
text on one line, aligned to the sentence afterwards), ``free`` (no grammar) and ``ngrams-chain``
(the n-gram grammar through llama-cpp-python's own sampler chain, which runs the grammar over the
whole vocabulary at every step: how freeal generated before it checked the best token first, and
before its answers ended at their first repeated line). Per way: seconds per sentence, generated
tokens, answers cut off or unreadable, and entity F1 against gold (gold only scores); with both
``ngrams`` ways, how many answers and how many sentences' spans are the same.

    python bench/ner_grammar.py --limit 60 --out bench/results/ner_grammar.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from llama_cpp import Llama, LlamaGrammar

from freeal.config import LLMConfig
from freeal.data import read_sentences
from freeal.llm import make_annotator
from freeal.llm.base import Generation
from freeal.llm.native import cpu_name
from freeal.llm.prompts import ner_prompt
from freeal.metrics import ner_report
from freeal.ner import END, align, answer_grammar, parse_lines, render, tags_from_spans
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def lines_grammar(types: list[str]) -> str:
    """The answer's line format alone: any one-line mention, checked by alignment afterwards."""
    kinds = " | ".join(json.dumps(t) for t in types)
    return (
        f'root ::= entity* "{END}"\n'
        'entity ::= type ": " mention "\\n"\n'
        f"type ::= {kinds}\n"
        "mention ::= [^\\n]{1,120}\n"
    )


def chain(llm: Llama, prompts: list, grammars: list[str]) -> Iterator[Generation]:
    """Greedy answers under each grammar from llama-cpp-python's own sampler chain."""
    for messages, grammar in zip(prompts, grammars, strict=True):
        out = llm.create_chat_completion(
            messages=messages,
            max_tokens=160,
            temperature=0.0,
            seed=0,
            grammar=LlamaGrammar.from_string(grammar, verbose=False),
        )
        yield Generation(
            out["choices"][0]["message"]["content"] or "",  # type: ignore[index]
            completion_tokens=out["usage"]["completion_tokens"],  # type: ignore[index]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="bc5cdr")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--ways", nargs="+", default=["ngrams", "lines", "free"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = load_task(DATA / args.dataset)
    data = read_sentences(DATA / args.dataset / "train.jsonl", task=task, limit=args.limit, seed=args.seed)
    types = task.label_names
    prompts = [ner_prompt(task, render(tokens)) for tokens in data.tokens]
    result: dict = {
        "machine": cpu_name(),
        "model": args.model,
        "dataset": args.dataset,
        "sentences": len(data),
        "slice": f"train: random {len(data)} (seed {args.seed})",
        "ways": {},
    }
    texts: dict[str, list[str]] = {}
    spans_of: dict[str, list[list]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for way in args.ways:
            annotator = make_annotator(
                LLMConfig(model=args.model, cache_path=Path(scratch) / f"{way}.sqlite")
            )
            grammars = {
                "ngrams": lambda: [answer_grammar(tokens, types) for tokens in data.tokens],
                "lines": lambda: [lines_grammar(types)] * len(data),
                "free": lambda: None,
            }[way.removesuffix("-chain")]()  # ngrams-chain: the same grammars, another sampler
            start = time.perf_counter()
            if way == "ngrams-chain":
                answers = dict(enumerate(chain(annotator.inner.llm, prompts, grammars or [])))
            else:
                answers = dict(
                    annotator.generate_many(
                        prompts, max_tokens=160, temperature=0.0, seed=0, grammars=grammars
                    )
                )
            seconds = time.perf_counter() - start
            texts[way] = [answers[i].text for i in range(len(data))]
            predicted, cut, unreadable, unaligned = [], 0, 0, 0
            for i, tokens in enumerate(data.tokens):
                text = answers[i].text
                if not text.rstrip().endswith(END):
                    cut += 1
                    text = text[: text.rfind("\n") + 1]
                try:
                    mentions = parse_lines(text, types)
                except ValueError:
                    unreadable += 1
                    mentions = []
                spans, missed = align(tokens, mentions)
                unaligned += missed
                spans_of.setdefault(way, []).append(spans)
                predicted.append(tags_from_spans(len(tokens), spans))
            report = ner_report(data.gold, predicted)
            result["ways"][way] = {
                "seconds_per_sentence": seconds / len(data),
                "generated_tokens_per_sentence": sum(a.completion_tokens for a in answers.values())
                / len(data),
                "evaluated_tokens_per_sentence": sum(a.evaluated_tokens for a in answers.values())
                / len(data),
                "cut_off": cut,
                "unreadable": unreadable,
                "unaligned_mentions": unaligned,
                "entity_f1": report["f1"],
                "precision": report["precision"],
                "recall": report["recall"],
            }
            if way.startswith("ngrams") and {"ngrams", "ngrams-chain"} <= set(texts):
                same = sum(a == b for a, b in zip(texts["ngrams"], texts["ngrams-chain"], strict=True))
                result["ngrams_answers_equal_to_chain"] = same
                result["ngrams_spans_equal_to_chain"] = sum(
                    a == b for a, b in zip(spans_of["ngrams"], spans_of["ngrams-chain"], strict=True)
                )
            print(way, json.dumps(result["ways"][way]), flush=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Issue 13: the demonstration step as the loop runs it, with its check, timed.

``initial_demos: generated`` with ``verify_demos`` (the default): the task kind's own step
(``write_demonstrations``) writes ``--per-label`` demonstrations per label (or entity type) with the
1.5B, fresh cache, shown style texts from a data set's train slice, and checks them zero-shot. The
step's seconds are split into writing (sampled generation) and checking (everything else: label
scoring, NER's zero-shot answers). Run it once with the code under test and once with an older
checkout on ``PYTHONPATH`` to compare (``--tag`` names the result); the step's interface is the same.
No gold label is read: the data sets give style texts only.

    python bench/demo_check.py --data trec --tag checked_in_rounds --out bench/results/demo_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from freeal.config import LLMConfig, LoopConfig
from freeal.data import read_items, read_sentences
from freeal.kinds import kind_of
from freeal.llm import make_annotator
from freeal.llm.native import cpu_name
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


class Timed:
    """The annotator, with the seconds spent reading its answers: sampled generation is writing,
    the rest (label scoring, NER's greedy zero-shot answers) is checking."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = {"writing": 0.0, "checking": 0.0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _timed(self, stream: Iterator, part: str) -> Iterator:
        while True:
            start = time.perf_counter()
            pair = next(stream, None)
            self.seconds[part] += time.perf_counter() - start
            if pair is None:
                return
            yield pair

    def score_many(self, prompts: Any, labels: Any) -> Iterator:
        return self._timed(self.inner.score_many(prompts, labels), "checking")

    def generate_many(self, prompts: Any, **kw: Any) -> Iterator:
        part = "writing" if kw.get("temperature", 0) > 0 else "checking"
        return self._timed(self.inner.generate_many(prompts, **kw), part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="a data set under ../shared/data (trec, bc5cdr, ...)")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--texts", type=int, default=1000, help="train texts (sentences) to draw style from")
    parser.add_argument("--per-label", type=int, default=16)
    parser.add_argument("--per-call", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = load_task(DATA / args.data)
    train = DATA / args.data / "train.jsonl"
    if task.kind == "ner":
        items: Any = read_sentences(train, task=task, limit=args.texts, seed=args.seed)
    else:
        items = read_items(train, task=task, limit=args.texts, seed=args.seed)
    loop = LoopConfig(
        initial_demos="generated",
        demos_per_label=args.per_label,
        demos_per_call=args.per_call,
        seed=args.seed,
    )
    said: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        cached = make_annotator(LLMConfig(model=args.model, cache_path=Path(scratch) / "c.sqlite"))
        annotator = Timed(cached)
        start = time.perf_counter()
        step = kind_of(task).write_demonstrations
        demos, numbers = step(annotator, items, loop, "auto", False, said.append)  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
    ledger = cached.ledger
    result = {
        "tag": args.tag,
        "data": args.data,
        "machine": cpu_name(),
        "model": args.model,
        "style_texts": len(items),
        "per_label": args.per_label,
        "per_call": args.per_call,
        "seed": args.seed,
        "seconds": seconds,
        "seconds_writing": annotator.seconds["writing"],
        "seconds_checking": annotator.seconds["checking"],
        "llm_calls": ledger.calls,
        "evaluated_tokens": ledger.evaluated_tokens,
        "completion_tokens": ledger.completion_tokens,
        "demonstrations": len(demos),
        "step": numbers,
        "said": said,
        "examples": demos[:: max(1, len(demos) // 6)],
    }
    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    key = (args.tag, args.data, args.seed)
    runs = [r for r in runs if (r["tag"], r["data"], r["seed"]) != key] + [result]
    args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)


if __name__ == "__main__":
    main()

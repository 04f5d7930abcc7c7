"""Benchmark: zero-shot label scoring on the real test sets, with and without contextual calibration.

One pass per (model, data set): the raw label log-scores of each item are kept, so the calibrated and
uncalibrated accuracies come from the same model calls. A fresh cache file is used so every item is a
real model call and the timing is honest. Run alone: llama.cpp on 2 cores slows badly beside other work.

    python bench/zeroshot.py --models qwen2.5-coder-1.5b qwen2.5-coder-0.5b --datasets sst2 mr trec
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path

from freeal.annotate import content_free_offsets, decide
from freeal.config import LLMConfig
from freeal.data import read_items
from freeal.llm import make_annotator
from freeal.llm.prompts import classification_prompt
from freeal.metrics import classification_report
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run_one(model: str, dataset: str, limit: int | None, seed: int, threads: int | None, cache: Path) -> dict:
    task = load_task(DATA / dataset)
    items = read_items(DATA / dataset / "test.jsonl", task=task, limit=limit, seed=seed)
    annotator = make_annotator(LLMConfig(model=model, n_threads=threads, cache_path=cache))
    labels = task.label_names
    offsets = content_free_offsets(task, annotator)
    prompts = [classification_prompt(task, t) for t in items.texts]
    answers = [None] * len(prompts)
    start = time.perf_counter()
    for i, answer in annotator.score_many(prompts, labels):
        answers[i] = answer
    elapsed = time.perf_counter() - start
    result: dict = {
        "model": model,
        "dataset": dataset,
        "split": "test",
        "items": len(items),
        "slice": f"random {limit} (seed {seed})" if limit and limit < len(items) + 1 else "all",
        "seconds_per_item": elapsed / len(items),
        "prompt_tokens_per_item": sum(a.prompt_tokens for a in answers) / len(items),
        "evaluated_tokens_per_item": sum(a.evaluated_tokens for a in answers) / len(items),
        "llm_calls": annotator.ledger.calls,
        "calibration_offsets": dict(zip(labels, offsets, strict=True)),
    }
    for name, offs in (("plain", None), ("calibrated", offsets)):
        predicted = [decide(a, labels, offs)[0] for a in answers]
        report = classification_report(items.gold, predicted, labels)
        result[name] = {
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "predicted_distribution": dict(Counter(predicted)),
            "confusion": report["confusion"],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mr", "trec"])
    parser.add_argument("--limit", type=int, default=None, help="random slice per data set (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "zeroshot.json")
    args = parser.parse_args()
    previous = json.loads(args.out.read_text())["runs"] if args.out.exists() else []
    runs = {(r["model"], r["dataset"]): r for r in previous}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for dataset in args.datasets:
                r = run_one(
                    model, dataset, args.limit, args.seed, args.threads, Path(tmp) / f"{model}.sqlite"
                )
                runs[(model, dataset)] = r
                print(
                    f"{model:20s} {dataset:5s} n={r['items']:5d} acc {r['plain']['accuracy']:.4f} / "
                    f"cal {r['calibrated']['accuracy']:.4f}  F1 {r['plain']['macro_f1']:.4f} / "
                    f"{r['calibrated']['macro_f1']:.4f}  {r['seconds_per_item']:.3f} s/item "
                    f"{r['prompt_tokens_per_item']:.0f} prompt tok "
                    f"({r['evaluated_tokens_per_item']:.0f} evaluated)",
                    flush=True,
                )
                args.out.write_text(
                    json.dumps(
                        {
                            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                            "threads": args.threads or "auto",
                            "runs": list(runs.values()),
                        },
                        indent=1,
                    )
                )


if __name__ == "__main__":
    main()

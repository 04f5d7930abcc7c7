"""Benchmark: the whole FreeAL loop on fixed random slices of the real train sets.

Per data set: a zero-shot baseline pass, demonstration writing, the initial round and the refinery
rounds, each with label accuracy (gold used only to score), the SLM's accuracy on the train texts and
on a test slice, LLM calls, tokens and time. A fresh LLM cache per run, so every call is real and the
timing honest. Run alone: llama.cpp on 2 cores slows badly beside other work.

    python bench/loop.py --datasets sst2 mr trec --limit 500
    python bench/loop.py --datasets bc5cdr --limit 300   # NER: entity F1 instead of accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.data import read_items, read_sentences
from freeal.loop import FreeAL
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run_one(
    dataset: str, limit: int, test_limit: int, seed: int, overrides: dict, tag: str, keep: Path | None
) -> dict:
    task = load_task(DATA / dataset)
    read = read_sentences if task.kind == "ner" else read_items
    items = read(DATA / dataset / "train.jsonl", task=task, limit=limit, seed=seed)
    test = read(DATA / dataset / "test.jsonl", task=task, limit=test_limit, seed=seed)
    scratch = Path(tempfile.mkdtemp(prefix=f"freeal-bench-{dataset}-"))
    run_dir = keep / f"{dataset}_{limit}_{tag}" if keep else scratch / "run"
    llm = LLMConfig(cache_path=(keep / "cache.sqlite") if keep else scratch / "cache.sqlite")
    slm = SLMConfig(**overrides.get("slm", {}))
    loop = LoopConfig(zero_shot_baseline=True, **overrides.get("loop", {}))
    runner = FreeAL(task, llm, slm, loop, run_dir=run_dir, progress=False, say=print)
    runner.fit(items, test=test)
    result = {
        "dataset": dataset,
        "tag": tag,
        "slice": f"train: random {len(items)} (seed {seed}); test: random {len(test)} (seed {seed})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {
            "llm": llm.model_dump(mode="json", exclude={"cache_path"}),
            "slm": slm.model_dump(),
            "loop": loop.model_dump(),
        },
        "report": runner.report_,
    }
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mr", "trec"])
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", default="{}", help='JSON, e.g. {"loop": {"group_size": null}}')
    parser.add_argument("--tag", default="default")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep run folders and the LLM cache here (a rerun then reuses answers: timings are not fresh)",
    )
    args = parser.parse_args()
    out = ROOT / "bench" / "results"
    for dataset in args.datasets:
        result = run_one(
            dataset, args.limit, args.test_limit, args.seed, json.loads(args.override), args.tag, args.keep
        )
        path = out / f"loop_{dataset}_{args.limit}_{args.tag}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

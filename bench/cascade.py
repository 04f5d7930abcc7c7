"""Issue 13's model cascade: the 0.5B labels every text, the 1.5B only those the 0.5B is least sure of.

Per slice (the same random 1,000 train texts as ``bench/quality.py``, so the 1.5B's zero-shot
answers of the kept quality runs are reused): a real 0.5B zero-shot pass (fresh cache, timed); the
texts ranked by the 0.5B's margin (top probability minus the second; an abstention first); for each
share ``q`` escalated, the cascade's labels are the 1.5B's on that share and the 0.5B's elsewhere.
No gold chooses anything: ``q`` is a budget, and gold only scores. On ``--time-seeds`` the 1.5B
is also run for real on all texts and on the escalated share of ``--headline`` (fresh caches), so
the cascade's time is measured against the 1.5B alone in the same process on the same machine.

    python bench/cascade.py --datasets sst2 mr trec --seeds 0 1 2 --runs /work/qcache \
        --out bench/results/cascade.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from freeal.annotate import annotate
from freeal.config import LLMConfig
from freeal.data import read_items, read_jsonl
from freeal.llm import make_annotator
from freeal.llm.native import cpu_name
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHARES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)


def margins(frame) -> np.ndarray:
    """Top probability minus the second per answer; -1 for an abstention (escalated first)."""
    out = []
    for label, probs in zip(frame["label"], frame["probs"], strict=True):
        if label is None or not isinstance(probs, dict):
            out.append(-1.0)
            continue
        top = sorted(probs.values(), reverse=True)
        out.append(top[0] - (top[1] if len(top) > 1 else 0.0))
    return np.asarray(out)


def accuracy(predicted: list, gold: list) -> float:
    return float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))


def timed(task, items, model: str, cache: Path) -> tuple[list, float, dict]:
    annotator = make_annotator(LLMConfig(model=model, cache_path=cache))
    start = time.perf_counter()
    frame = annotate(task, items, annotator, calibrate="auto", progress=False)
    seconds = time.perf_counter() - start
    ledger = annotator.ledger
    usage = {"calls": ledger.calls, "evaluated_tokens": ledger.evaluated_tokens}
    return frame, seconds, usage


def run_slice(args: argparse.Namespace, dataset: str, seed: int, scratch: Path) -> dict:
    task = load_task(DATA / dataset)
    items = read_items(DATA / dataset / "train.jsonl", task=task, limit=args.limit, seed=seed)
    big_rows = {
        r["id"]: r["label"]
        for r in read_jsonl(
            args.runs / f"default_{dataset}_{args.limit}_s{seed}" / "zero-shot" / "labels.jsonl"
        )
    }
    big = [big_rows[i] for i in items.ids]
    small_frame, small_seconds, small_usage = timed(
        task, items, args.small, scratch / f"small_{dataset}_{seed}.sqlite"
    )
    small = list(small_frame["label"])
    order = np.argsort(margins(small_frame), kind="stable")  # least sure first
    result: dict = {
        "dataset": dataset,
        "seed": seed,
        "items": len(items),
        "small": {
            "model": args.small,
            "accuracy": accuracy(small, items.gold),
            "seconds": small_seconds,
            **small_usage,
        },
        "big": {
            "model": args.big,
            "accuracy": accuracy(big, items.gold),
            "source": "the quality run's zero-shot answers",
        },
        "shares": {},
    }
    for q in SHARES:
        chosen = set(order[: round(q * len(items))].tolist())
        labels = [big[i] if i in chosen else small[i] for i in range(len(items))]
        result["shares"][str(q)] = {
            "escalated": len(chosen),
            "accuracy": accuracy(labels, items.gold),
            "agreement_with_big": accuracy(labels, big),
        }
    if seed in args.time_seeds:
        _, big_seconds, big_usage = timed(task, items, args.big, scratch / f"big_{dataset}_{seed}.sqlite")
        chosen = sorted(order[: round(args.headline * len(items))].tolist())
        subset = read_items(
            pd.DataFrame({"id": [items.ids[i] for i in chosen], "text": [items.texts[i] for i in chosen]}),
            id_col="id",
            label_col=None,
        )
        sub_frame, sub_seconds, sub_usage = timed(
            task, subset, args.big, scratch / f"sub_{dataset}_{seed}.sqlite"
        )
        replaced = dict(zip(subset.ids, sub_frame["label"], strict=True))
        labels = [replaced.get(i, s) for i, s in zip(items.ids, small, strict=True)]
        result["timed"] = {
            "share": args.headline,
            "big_alone_seconds": big_seconds,
            "big_alone_usage": big_usage,
            "cascade_seconds": small_seconds + sub_seconds,
            "cascade_big_seconds": sub_seconds,
            "cascade_big_usage": sub_usage,
            "cascade_accuracy": accuracy(labels, items.gold),
            "time_ratio": (small_seconds + sub_seconds) / big_seconds,
        }
    print(json.dumps({k: v for k, v in result.items() if k != "shares"}), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mr", "trec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--time-seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--runs", type=Path, required=True, help="folder of the kept quality runs")
    parser.add_argument("--small", default="qwen2.5-coder-0.5b")
    parser.add_argument("--big", default="qwen2.5-coder-1.5b")
    parser.add_argument("--headline", type=float, default=0.3, help="share escalated in the timed run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # slices measured by an earlier invocation stay, unless measured again
    slices = json.loads(args.out.read_text())["slices"] if args.out.is_file() else []
    with tempfile.TemporaryDirectory() as scratch:
        for dataset in args.datasets:
            for seed in args.seeds:
                slices = [s for s in slices if (s["dataset"], s["seed"]) != (dataset, seed)]
                slices.append(run_slice(args, dataset, seed, Path(scratch)))
                summary = {}
                for ds in dict.fromkeys(s["dataset"] for s in slices):
                    mine = [s for s in slices if s["dataset"] == ds]
                    summary[ds] = {
                        q: {
                            "accuracy_mean": statistics.mean(s["shares"][q]["accuracy"] for s in mine),
                            "gain_over_big_points": [
                                100 * (s["shares"][q]["accuracy"] - s["big"]["accuracy"]) for s in mine
                            ],
                        }
                        for q in map(str, SHARES)
                    }
                args.out.write_text(
                    json.dumps({"machine": cpu_name(), "slices": slices, "summary": summary}, indent=1) + "\n"
                )


if __name__ == "__main__":
    main()

"""Benchmark: the SLM's robust self-training on noisy labels (clean split, feedback, accuracy).

Noisy labels come from one of: the real gpt-3.5-turbo labels shipped for MR (``--labels gpt35``), a
``freeal annotate`` output on the train texts (``--labels-file``), or synthetic uniform flips of
known rate (``--noise``; marked as synthetic in the results). Gold train labels are read only to
score the results. For each mode and variant (robust / plain cross-entropy on the noisy labels /
plain on gold) it records transductive and inductive accuracy, the GMM clean split's size and
precision, the feedback clean set (SLM agrees, lowest loss per class) at several fractions, time
per epoch and peak memory.

    python bench/slm.py --dataset mr --labels gpt35 --modes head finetune
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from freeal.config import SLMConfig
from freeal.data import read_items, read_jsonl
from freeal.feedback import select_clean
from freeal.slm.augment import make_views
from freeal.slm.classifier import SLMClassifier
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]


def noisy_labels(
    args: argparse.Namespace, data: Path, gold: list[str], labels: list[str]
) -> tuple[list, dict]:
    """The labels to learn from, the augmented views (if shipped) and a description of their source."""
    if args.labels == "gpt35":
        items = read_items(data / "train_llm_gpt35.jsonl", label_col="llm_label", keep=("backtranslation",))
        return items.gold, {
            "source": "gpt-3.5-turbo (FreeAL reference)",
            "views": items.extra["backtranslation"],
        }
    if args.labels_file:  # `freeal annotate` output on (a slice of) train.jsonl: ids are its row numbers
        noisy: list[str | None] = [None] * len(gold)
        rows = read_jsonl(args.labels_file)
        for row in rows:
            noisy[int(row["id"])] = row["label"]
        subset = sorted(int(row["id"]) for row in rows)
        return noisy, {"source": f"freeal annotate: {args.labels_file.name}", "views": None, "subset": subset}
    rng = np.random.default_rng(args.seed)
    flip = rng.random(len(gold)) < args.noise
    noisy = [labels[int(rng.integers(len(labels)))] if f else g for f, g in zip(flip, gold, strict=True)]
    return noisy, {"source": f"SYNTHETIC: uniform random label with probability {args.noise}", "views": None}


def accuracy(predicted: list[str], gold: list[str]) -> float:
    return float(np.mean([p == g for p, g in zip(predicted, gold, strict=True)]))


def run(args: argparse.Namespace) -> dict:
    data = (
        ROOT.parent / "shared" / "data" / args.dataset
        if args.data_root is None
        else args.data_root / args.dataset
    )
    task = load_task(data)
    train = read_items(data / "train.jsonl", task=task)
    test = read_items(data / "test.jsonl", task=task)
    noisy, info = noisy_labels(args, data, train.gold, task.label_names)
    subset = np.asarray(info.get("subset", range(len(train))))
    if args.limit and "subset" not in info:
        subset = np.sort(np.random.default_rng(args.seed).choice(len(train), args.limit, replace=False))
    texts = [train.texts[i] for i in subset]
    gold = [train.gold[i] for i in subset]
    noisy = [noisy[i] for i in subset]
    shipped_views = [info["views"][i] for i in subset] if info["views"] else None
    given = [n for n in noisy if n is not None]
    result: dict = {
        "dataset": args.dataset,
        "items": len(texts),
        "labels": info["source"],
        "label_accuracy": float(np.mean([n == g for n, g in zip(noisy, gold, strict=True) if n is not None])),
        "abstained": sum(n is None for n in noisy),
        "given": len(given),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "split": "global" if args.global_split else "per class",
        "backbone": args.backbone or "all-minilm-l6-v2",
        "runs": [],
    }
    for mode in args.modes:
        for variant in args.variants:
            for view_kind in args.views if variant == "robust" else ["none"]:
                if view_kind == "shipped" and shipped_views is None:
                    continue
                views = shipped_views if view_kind == "shipped" else make_views(texts, args.seed)
                targets = gold if variant == "gold" else noisy
                cfg = SLMConfig(
                    mode=mode,
                    robust=variant == "robust",
                    epochs=args.epochs,
                    seed=args.seed,
                    backbone=args.backbone,
                    split_per_class=not args.global_split,
                    **dict(kv.split("=", 1) for kv in args.set),
                )
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                slm = SLMClassifier(task.label_names, cfg).fit(texts, targets, views=views)
                seconds = time.perf_counter() - start
                predicted = [task.label_names[i] for i in slm.train_proba_.argmax(1)]
                test_acc = accuracy(slm.predict(test.texts), test.gold)
                entry = {
                    "overrides": args.set,
                    "mode": mode,
                    "variant": variant,
                    "views": view_kind,
                    "epochs": args.epochs,
                    "seconds_per_epoch": seconds / args.epochs,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
                    if torch.cuda.is_available()
                    else None,
                    "transductive_accuracy": accuracy(predicted, gold),
                    "inductive_accuracy": test_acc,
                    "epoch_log": slm.epoch_log,
                }
                if variant != "gold":
                    mask = slm.clean_mask_
                    entry["gmm_clean"] = {
                        "size": int(mask.sum()),
                        "share": float(mask.mean()),
                        "precision": float(np.mean([noisy[i] == gold[i] for i in np.flatnonzero(mask)])),
                    }
                    for key, ranking in (
                        ("feedback_clean", slm.mean_loss_),
                        ("feedback_clean_final", slm.train_loss_),
                    ):
                        entry[key] = {}
                        for fraction in (0.2, 0.25, 0.3):
                            agree = [n == p for n, p in zip(noisy, predicted, strict=True)]
                            chosen = select_clean(noisy, agree, ranking, fraction)
                            entry[key][str(fraction)] = {
                                "size": len(chosen),
                                "share": len(chosen) / len(texts),
                                "precision": float(np.mean([noisy[i] == gold[i] for i in chosen])),
                            }
                result["runs"].append(entry)
                fb = entry.get("feedback_clean", {}).get("0.2", {})
                print(
                    f"{mode:8s} {variant:6s} views={view_kind:8s} trans {entry['transductive_accuracy']:.4f} "
                    f"test {test_acc:.4f} {entry['seconds_per_epoch']:.1f} s/epoch "
                    f"clean20 {fb.get('size', '-')} @ {fb.get('precision', float('nan')):.4f}",
                    flush=True,
                )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="mr")
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--labels", choices=["gpt35", "synthetic", "file"], default="gpt35")
    parser.add_argument("--labels-file", type=Path, default=None)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--modes", nargs="+", default=["head"])
    parser.add_argument("--variants", nargs="+", default=["robust", "plain", "gold"])
    parser.add_argument("--views", nargs="+", default=["shipped", "noise"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--backbone", default=None, help="encoder folder (default: the shipped MiniLM)")
    parser.add_argument("--global-split", action="store_true", help="one GMM over all classes")
    parser.add_argument("--set", nargs="*", default=[], help="SLMConfig overrides, e.g. lambda_u=0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

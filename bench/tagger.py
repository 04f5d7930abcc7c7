"""Benchmark: the token tagger alone on one set of LLM entity labels, trained several ways.

Takes the LLM's labels of a finished NER loop run (``round-0/llm``, the initial round) and trains the
tagger on them robustly (GMM split per sentence or per token), with plain cross-entropy, and on the
gold tags of the same sentences; scores each on the test slice (entity F1) and its clean split
against gold (share of clean-flagged sentences whose LLM tags are all right).

    python bench/tagger.py --run /tmp/nerbench/bc5cdr_200_default --test-limit 300

``--labels final --settings run``: only the tagger with the run's own settings, trained on the
run's final labels (``final/answers.jsonl``) and scored on the run's test slice, beside the test
F1 of the run's own last-round tagger: what retraining the deployed tagger on the final labels
would give.

    python bench/tagger.py --run DIR/default_bc5cdr_300_s0 --test-limit 500 --seed 0 \
        --labels final --settings run --tag final_s0
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from freeal.config import SLMConfig
from freeal.data import read_jsonl, read_sentences
from freeal.metrics import ner_report
from freeal.ner import tags_from_spans
from freeal.slm.tagger import SLMTagger
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished NER run folder")
    parser.add_argument("--dataset", default="bc5cdr")
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--tag", default="default")
    parser.add_argument("--labels", choices=["round-0", "final"], default="round-0")
    parser.add_argument("--settings", choices=["bench", "run"], default="bench")
    args = parser.parse_args()
    task = load_task(DATA / args.dataset)
    spec = json.loads((args.run / "run.json").read_text())
    items = read_jsonl(args.run / "items.jsonl")
    ids = [r["id"] for r in items]
    gold_all = read_sentences(DATA / args.dataset / "train.jsonl", task=task)
    by_id = dict(zip(gold_all.ids, gold_all.gold or [], strict=True))
    gold = [by_id[i] for i in ids]  # evaluation only
    tokens = [r["tokens"] for r in items]
    source = "round-0/llm/labels.jsonl" if args.labels == "round-0" else "final/answers.jsonl"
    spans = {r["id"]: r["spans"] for r in read_jsonl(args.run / source)}
    given = [
        None if spans[i] is None else tags_from_spans(len(t), spans[i])
        for i, t in zip(ids, tokens, strict=True)
    ]
    exact = np.asarray([g == t for g, t in zip(given, gold, strict=True)])
    test = read_sentences(
        DATA / args.dataset / "test.jsonl", task=task, limit=args.test_limit, seed=args.seed
    )
    base = {"epochs": args.epochs, "warmup_epochs": 2, "batch_size": 16, "device": "cpu"}
    variants = {
        "robust, split per sentence": (given, {"split_unit": "sentence"}),
        "robust, split per token": (given, {"split_unit": "token"}),
        "plain CE": (given, {"robust": False}),
        "gold tags, plain CE": (gold, {"robust": False}),
    }
    if args.settings == "run":  # the loop's own tagger, as the run made it
        base = {**spec["slm"], "device": "cpu"}
        variants = {f"the run's settings, {args.labels} labels": (given, {})}
    rows = []
    for name, (tags, extra) in variants.items():
        cfg = SLMConfig(**{**base, **extra})
        start = time.perf_counter()
        tagger = SLMTagger(task.label_names, cfg).fit(tokens, tags)
        seconds = time.perf_counter() - start
        row = {
            "variant": name,
            "inductive": ner_report(test.gold, tagger.predict(test.tokens)),
            "transductive": ner_report(gold, tagger.train_tags_),
            "seconds_per_epoch": seconds / args.epochs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if cfg.robust:
            mask = tagger.clean_mask_
            row["clean_share"] = float(mask.mean())
            row["clean_precision"] = float(exact[mask].mean()) if mask.any() else None
            row["noisy_precision"] = float(exact[~mask].mean()) if (~mask).any() else None
        if args.settings == "run":
            report = json.loads((args.run / "report.json").read_text())
            row["run_last_round_tagger_inductive"] = report["rounds"][-1]["slm"]["inductive"]
        rows.append(row)
        print(name, round(row["inductive"]["f1"], 4), row.get("clean_share"), row.get("clean_precision"))
    out = ROOT / "bench" / "results" / f"tagger_{args.dataset}_{len(tokens)}_{args.tag}.json"
    out.write_text(
        json.dumps(
            {
                "dataset": args.dataset,
                "labels": f"{args.labels} labels of {spec['texts']['n']} train sentences "
                f"({float(exact.mean()):.3f} of sentences entirely right)",
                "test": f"random {len(test)} test sentences (seed {args.seed})",
                "settings": base,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

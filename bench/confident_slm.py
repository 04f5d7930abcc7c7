"""The SLM handed back, trained on every final label or only on the confident ones (a probe).

For finished run folders of ``bench/quality.py``: the run's final labels and their ``confidence``
train logistic regressions on the same standardized mpnet layer means and C as the ``linear`` SLM
handed back, with every label weighing 1 ("all": the handed-back SLM's test accuracy again), weighed
by confidence, by confidence above chance, or only the most confident 80% / 60%. Gold only to
score, on the test set (``--test-limit`` random test texts, drawn with ``--seed`` as the protocol
draws a slice's test texts with its seed). The data set is the one the run's ``run.json`` names.

    python bench/confident_slm.py --run DIR/default_mr_1000_s0 --test-limit 100000 \
        --out bench/results/confident_slm.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def probe(run: Path, test_limit: int, seed: int) -> dict:
    from sklearn.linear_model import LogisticRegression

    from freeal.data import read_items
    from freeal.embed import Embedder, encoder_path
    from freeal.slm.linear import C
    from freeal.tasks import load_task

    dataset = json.loads((run / "run.json").read_text())["task"]["name"]
    rows = [json.loads(line) for line in (run / "labels.jsonl").read_text().splitlines()]
    lines = (DATA / dataset / "train.jsonl").read_text().splitlines()
    train = [json.loads(lines[int(r["id"])]) for r in rows]
    labels = np.array([r["label"] for r in rows], dtype=object)
    gold = np.array([t["label"] for t in train], dtype=object)
    confidence = np.array([r["confidence"] or 0.0 for r in rows])
    task = load_task(DATA / dataset)
    test = read_items(DATA / dataset / "test.jsonl", task=task, limit=test_limit, seed=seed)
    embedder = Embedder(encoder_path("all-mpnet-base-v2"), device="cpu", pooling="layers")
    x = np.asarray(embedder.encode([t["text"] for t in train]), dtype=np.float64)
    x_test = np.asarray(embedder.encode(test.texts), dtype=np.float64)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / scale, (x_test - mean) / scale
    chance = 1 / len(task.label_names)
    weights = {
        "all": np.ones(len(x)),
        "confidence": confidence,
        "confidence_above_chance": np.clip((confidence - chance) / (1 - chance), 0, 1),
        "top80": (confidence >= np.quantile(confidence, 0.2)).astype(float),
        "top60": (confidence >= np.quantile(confidence, 0.4)).astype(float),
    }
    result: dict = {
        "run": run.name,
        "dataset": dataset,
        "final_labels_accuracy": float((labels == gold).mean()),
        "test_texts": len(test.texts),
        "C": C,
    }
    test_gold = np.array(test.gold, dtype=object)
    for name, w in weights.items():
        kept = w > 0
        model = LogisticRegression(C=C, max_iter=3000).fit(x[kept], labels[kept], sample_weight=w[kept])
        result[name] = {
            "test_accuracy": float((model.predict(x_test) == test_gold).mean()),
            "trained_on": int(kept.sum()),
            "their_accuracy": float((labels[kept] == gold[kept]).mean()),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, nargs="+", required=True)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="the runs' slice seed (their test draw)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = [probe(run, args.test_limit, args.seed) for run in args.run]
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Issue 14: the classifier SLM's step with its held-out folds in one process and beside the main
model in worker processes, on the LLM labels of real runs: the time of each, and whether the two
give the same model and probabilities bit for bit.

For each run folder of ``bench/quality.py --keep DIR`` (``default_<data>_<n>_s<seed>``), the
round-0 SLM step again: the same texts (the benchmark's slice), the LLM's round-0 answers as the
labels, the run's own SLM settings. Timed first with ``FREEAL_SLM_PROCESSES=1`` (every fold in
this process), then with the default (the machine's cores; the worker processes are started
for the first run and kept for the others, as within a loop); the sentence vectors are read from
the disk cache (computed once before the first timing, not timed). Also compared: the run folder's
own held-out probabilities, written by the code of its time, possibly on another CPU. Gold labels
are not read.

    python bench/slm_folds.py --runs DIR --out bench/results/slm_folds.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from freeal.config import SLMConfig
from freeal.data import read_items, read_jsonl
from freeal.embed import Embedder, encoder_path
from freeal.kinds import kind_of
from freeal.llm.native import cpu_name
from freeal.slm import folds
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def one(run: Path) -> dict:
    _, dataset, limit, seed = run.name.rsplit("_", 3)
    task = load_task(DATA / dataset)
    items = read_items(DATA / dataset / "train.jsonl", task=task, limit=int(limit), seed=int(seed[1:]))
    answers = {row["id"]: row["label"] for row in read_jsonl(run / "round-0" / "llm" / "labels.jsonl")}
    given = [answers[i] for i in items.ids]
    cfg = SLMConfig(**json.loads((run / "run.json").read_text())["slm"])
    Embedder(encoder_path(cfg.backbone)).encode(items.texts)  # into the disk cache, untimed
    kind = kind_of(task)
    timed = []
    for processes in ("1", None):  # every fold here, then the machine's cores
        if processes:
            os.environ[folds.ENV_VAR] = processes
        start = time.perf_counter()
        fit = kind.train(items, given, cfg, lambda _: None)
        timed.append((time.perf_counter() - start, fit))
        os.environ.pop(folds.ENV_VAR, None)
    (alone_s, alone), (beside_s, beside) = timed
    names = task.label_names
    stored = {row["id"]: row["probs"] for row in read_jsonl(run / "round-0" / "slm" / "predictions.jsonl")}
    recorded = np.asarray([[stored[i][n] for n in names] for i in items.ids])
    assert alone.proba is not None and beside.proba is not None
    return {
        "run": run.name,
        "items": len(items),
        "backbone": cfg.backbone,
        "processes": folds.cores(),
        "seconds_one_process": alone_s,
        "seconds_beside": beside_s,
        "speedup": alone_s / beside_s,
        "identical": bool(
            np.array_equal(alone.proba, beside.proba)
            and np.array_equal(alone.model.train_proba_, beside.model.train_proba_)
            and np.array_equal(alone.clean, beside.clean)
        ),
        "max_abs_diff_to_run_folder": float(np.abs(beside.proba - recorded).max()),
        "predictions_equal_to_run_folder": int(
            sum(a == b for a, b in zip(beside.proba.argmax(1), recorded.argmax(1), strict=True))
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="bench/quality.py's --keep folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    # the slices are of 1,000 texts: measured whatever the threshold, to decide it
    folds.PARALLEL_MIN_ITEMS = 0
    runs = sorted(
        p
        for p in args.runs.glob("default_*_*_s*")
        if (p / "round-0" / "slm").is_dir()
        and load_task(DATA / p.name.split("_")[1]).kind == "classification"
    )
    results = []
    for number, run in enumerate(runs):
        results.append({**one(run), "worker_started_here": number == 0})
        print(json.dumps(results[-1]), flush=True)
    speedups = [r["speedup"] for r in results]
    payload = {
        "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores",
        "runs": results,
        "all_identical": all(r["identical"] for r in results),
        "speedup_mean": float(np.mean(speedups)),
        "speedup_range": [min(speedups), max(speedups)],
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()

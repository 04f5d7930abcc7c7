"""Benchmark: which SLM to hand back, the last round's or one trained once more on the final labels?

For each kept quality run (``bench/quality.py --keep DIR``): the SLM trained with the run's SLM
settings on the run's final labels (``final/answers.jsonl``), as the loop's ``deployed_slm:
final_labels`` step trains it when ``deployed_mode`` is the run's own mode (``--set mode=linear
pooling=layers`` for a classifier's default), scored on the run's test slice beside the run's
last-round SLM.
Either kind of task (the loop's :class:`~freeal.kinds.base.TaskKind` trains and predicts). Gold
labels only score; the SLM sees the final labels alone. Run alone: it trains models.

``--set KEY=VALUE`` changes the SLM's settings from the run's (e.g. ``mode=linear``), and
``--gold`` adds the same SLM trained on the slice's gold labels: the ceiling of its features, a
measurement beside the run, never an input to it.
``--data DIR`` reads the data sets from another folder than ``../shared/data`` (a GPU machine,
where the runs and data travel in the working tree); each row names the device it trained on.

    python bench/deployed_slm.py --runs DIR --datasets sst2 mr trec --seeds 0 1 2 --limit 1000 \
        --out bench/results/deployed_slm_chatturn_runs.json
    python bench/deployed_slm.py --runs DIR --datasets sst2 mr trec --limit 1000 \
        --set mode=linear pooling=layers --gold --out bench/results/frozen_slm_linear_layers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from freeal.config import SLMConfig
from freeal.data import read_items, read_jsonl, read_sentences
from freeal.embed import torch_device
from freeal.kinds import kind_of
from freeal.ner import spans_from_tags
from freeal.report import score
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def one(
    run: Path, data: Path, dataset: str, limit: int, seed: int, test_limit: int, overrides: dict, gold: bool
) -> dict:
    """The run's last-round SLM and the SLM trained on its final labels, on the run's test slice."""
    task = load_task(data / dataset)
    kind = kind_of(task)
    read = read_sentences if task.kind == "ner" else read_items
    items = read(data / dataset / "train.jsonl", task=task, limit=limit, seed=seed)
    test = read(data / dataset / "test.jsonl", task=task, limit=test_limit, seed=seed)
    if items.ids != [r["id"] for r in read_jsonl(run / "items.jsonl")]:
        raise SystemExit(f"{run}: its items are not the slice (data set {dataset}, seed {seed})")
    spec = json.loads((run / "run.json").read_text())
    report = json.loads((run / "report.json").read_text())
    final = [r[kind.answer_key] for r in read_jsonl(run / "final/answers.jsonl")]
    last = report["final"]["round"]
    config = SLMConfig(**{**spec["slm"], **overrides})
    start = time.perf_counter()
    fit = kind.train(items, final, config, lambda entry: None)
    seconds = time.perf_counter() - start
    row = {
        "run": run.name,
        "overrides": overrides,
        "final_labels": score(report["final"]["metrics"]),
        "last_round_slm_test": score(report["rounds"][last]["slm"]["inductive"]),
        "run_handed_back_slm_test": score((report.get("deployed_slm") or {}).get("inductive")),
        "final_labels_slm_test": score(kind.score(test.gold, kind.predict(fit.model, test))),
        "seconds": seconds,
        "device": device_name(config.device),
        "test": len(test),
    }
    if gold:
        truth = list(items.gold)  # NER's gold is IOB2 tags; the kind learns from span lists
        if task.kind == "ner":
            truth = [[list(span) for span in spans_from_tags(tags)] for tags in truth]
        ceiling = kind.train(items, truth, config, lambda entry: None)
        row["gold_labels_slm_test"] = score(kind.score(test.gold, kind.predict(ceiling.model, test)))
    return row


def device_name(device: str) -> str:
    """The device the SLM trained on, as a table names it (the GPU's name, or ``cpu``)."""
    resolved = torch_device(device)
    if resolved.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(resolved))
    return resolved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="bench/quality.py's --keep folder")
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", type=int, required=True)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--set", nargs="*", default=[], help="SLMConfig changes, e.g. mode=linear")
    parser.add_argument("--gold", action="store_true", help="also train on gold labels (a ceiling)")
    parser.add_argument("--data", type=Path, default=DATA, help="the data sets' folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    out: dict = {}
    for dataset in args.datasets:
        rows = []
        for seed in args.seeds:
            run = args.runs / f"{args.preset}_{dataset}_{args.limit}_s{seed}"
            rows.append(one(run, args.data, dataset, args.limit, seed, args.test_limit, overrides, args.gold))
            print(json.dumps(rows[-1]), flush=True)
        gain = [100 * (r["final_labels_slm_test"] - r["last_round_slm_test"]) for r in rows]
        out[dataset] = {
            "slices": rows,
            "gain_points": gain,
            "gain_mean": statistics.mean(gain),
            "gain_sd": statistics.stdev(gain) if len(gain) > 1 else None,
        }
        args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

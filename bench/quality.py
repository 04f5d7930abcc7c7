"""Benchmark: does the loop pay for itself? Final labels against the same model's zero-shot labels.

Per data set and slice (a random sample of the train set, one seed each): the whole run with the
zero-shot baseline beside it, the SLM on a random test slice (inductive), LLM calls and time. Gold
labels are used only to score. One JSON per run in ``bench/results/quality_<preset>_<data>_<n>_s<seed>.json``;
after every run ``bench/results/quality_summary.json`` is rebuilt from all such files, in the shape
``{"<data set>": {"zero_shot": [...], "final": [...], "slm_test": [...], "metric": ...}}`` per
preset (``default`` at the top level, other presets under their name).

Presets: ``default`` (the library's defaults) and ``paper`` (the FreeAL paper's settings: written
demonstrations to start, each text with its own nearest demonstrations, refinery answers taken as
they are, the LLM's last answer as the label, consistency loss on, 20% clean set, every refinery round run:
the paper has no early stop and no agreement check, so ``min_change`` is 0 there and ``min_kappa``
-1).

    python bench/quality.py --datasets sst2 mr trec --seeds 0 1 2 --limit 1000 --keep /tmp/q
    python bench/quality.py --datasets bc5cdr --seeds 0 1 --limit 300 --keep /tmp/q
    python bench/quality.py --preset paper --datasets sst2 --seeds 0 --limit 200 --keep /tmp/q

``--keep`` holds the LLM cache and run folders, so a stopped benchmark resumes without paying again
for LLM calls (the timings of answers taken from the cache are then not fresh: ``llm_calls`` says
how many were real). Run alone: llama.cpp on 2 cores slows badly beside other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.data import read_items, read_jsonl, read_sentences
from freeal.kinds import kind_of
from freeal.loop import FreeAL
from freeal.report import score
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"

PRESETS: dict[str, dict] = {
    "default": {},
    "paper": {
        "loop": {
            "initial_demos": "generated",
            "group_size": None,
            "refined_label": "new",
            "refine": "noisy",
            "final_label": "llm",
            "clean_fraction": 0.2,
            "min_change": 0.0,
            "min_kappa": -1.0,
        },
        "slm": {"lambda_u": 1.0, "cross_fit": 0},
    },
}


def run_one(
    dataset: str, limit: int, test_limit: int, seed: int, preset: str, keep: Path, override: dict
) -> dict:
    task = load_task(DATA / dataset)
    read = read_sentences if task.kind == "ner" else read_items
    items = read(DATA / dataset / "train.jsonl", task=task, limit=limit, seed=seed)
    test = read(DATA / dataset / "test.jsonl", task=task, limit=test_limit, seed=seed)
    settings = PRESETS[preset]
    llm = LLMConfig(cache_path=keep / "cache.sqlite", **override.get("llm", {}))
    slm = SLMConfig(**{**settings.get("slm", {}), **override.get("slm", {})})
    loop = LoopConfig(zero_shot_baseline=True, **{**settings.get("loop", {}), **override.get("loop", {})})
    tag = preset + ("-" + json.dumps(override, sort_keys=True) if override else "")
    run_dir = keep / f"{tag}_{dataset}_{limit}_s{seed}".replace(" ", "").replace('"', "")
    runner = FreeAL(task, llm, slm, loop, run_dir=run_dir, progress=False, say=print)
    runner.fit(items, test=test)
    report = runner.report_
    return {
        "dataset": dataset,
        "preset": preset,
        "override": override,
        "seed": seed,
        "slice": f"train: random {len(items)} (seed {seed}); test: random {len(test)} (seed {seed})",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {
            "llm": runner.llm_config.model_dump(mode="json", exclude={"cache_path"}),
            "slm": runner.slm_config.model_dump(mode="json"),
            "loop": runner.loop_config.model_dump(mode="json"),
        },
        "zero_shot": score(report["zero_shot"]["metrics"]),
        "llm_labels": [score(rd["llm"]["metrics"]) for rd in report["rounds"]],
        "final": score(report["final"]["metrics"]),
        "slm_test": score(handed_back(report).get("inductive")),
        "metric": "entity_f1" if task.kind == "ner" else "accuracy",
        "report": report,
    }


def handed_back(report: dict) -> dict:
    """The step of the SLM a run hands back: trained on the final labels (``deployed_slm``), or
    the last round's (the step then says which round: the final labels were its answers)."""
    return report.get("deployed_slm") or report["rounds"][-1]["slm"] or {}


def weight_sensitivity(run: dict, weights: tuple[float, ...] = (0, 0.25, 0.5, 1, 2)) -> dict:
    """The final labels' score had the SLM weighed ``weights`` instead (from the run folder's saved
    answers: no model runs); gold only to score. Shows how much the default rests on its value."""
    task = load_task(DATA / run["dataset"])
    read = read_sentences if task.kind == "ner" else read_items
    seed, n = run["seed"], int(run["report"]["items"])
    items = read(DATA / run["dataset"] / "train.jsonl", task=task, limit=n, seed=seed)
    folder = Path(run["report"]["run_dir"])
    rounds = [
        (
            read_jsonl(folder / f"round-{r}/llm/labels.jsonl"),
            read_jsonl(folder / f"round-{r}/slm/predictions.jsonl"),
        )
        for r in range(run["report"]["final"]["round"] + 1)
    ]
    kind = kind_of(task)
    return {str(w): score(kind.score(items.gold, kind.combine(items, rounds, w)[0])) for w in weights}


def summarise(results: Path) -> dict:
    """quality_summary.json from every per-run file: per preset and data set, the per-slice numbers
    (in seed order) with their mean and spread."""
    summary: dict = {}
    for path in sorted(results.glob("quality_*_s*.json")):
        run = json.loads(path.read_text())
        where = summary if run["preset"] == "default" else summary.setdefault(run["preset"], {})
        entry = where.setdefault(
            run["dataset"],
            {"metric": run["metric"], "seeds": [], "zero_shot": [], "final": [], "slm_test": []},
        )
        entry["seeds"].append(run["seed"])
        for key in ("zero_shot", "final", "slm_test"):
            entry[key].append(run[key])
    for where in [summary, *(v for v in summary.values() if isinstance(v, dict) and "metric" not in v)]:
        for entry in where.values():
            if "metric" not in entry:
                continue
            order = sorted(range(len(entry["seeds"])), key=entry["seeds"].__getitem__)
            for key in ("seeds", "zero_shot", "final", "slm_test"):
                entry[key] = [entry[key][i] for i in order]
            gains = [f - z for f, z in zip(entry["final"], entry["zero_shot"], strict=True)]
            entry["gain_mean"] = statistics.mean(gains)
            entry["gain_min"] = min(gains)
            entry["gain_spread"] = statistics.stdev(gains) if len(gains) > 1 else None
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mr", "trec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--keep", type=Path, help="LLM cache and run folders (resumable); needed for runs")
    parser.add_argument(
        "--override",
        default="{}",
        help='settings over the preset, JSON: {"llm": {...}, "slm": ..., "loop": ...}',
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON files go")
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="no runs: add the slm_weight sensitivity to the finished runs' JSON files",
    )
    args = parser.parse_args()
    if args.sensitivity:
        for path in sorted(args.results.glob(f"quality_{args.preset}_*_s*.json")):
            run = json.loads(path.read_text())
            run["slm_weight_sensitivity"] = weight_sensitivity(run)
            path.write_text(json.dumps(run, indent=2))
            print(path.name, run["slm_weight_sensitivity"])
        return
    if args.keep is None:
        parser.error("--keep is needed to run")
    args.keep.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    override = json.loads(args.override)
    for seed in args.seeds:
        for dataset in args.datasets:
            path = args.results / f"quality_{args.preset}_{dataset}_{args.limit}_s{seed}.json"
            result = run_one(dataset, args.limit, args.test_limit, seed, args.preset, args.keep, override)
            path.write_text(json.dumps(result, indent=2))
            print(
                f"{dataset} seed {seed} ({args.preset}): zero-shot {result['zero_shot']:.3f}, "
                f"final {result['final']:.3f}, SLM test {result['slm_test']:.3f}",
                flush=True,
            )
            (args.results / "quality_summary.json").write_text(json.dumps(summarise(args.results), indent=2))


if __name__ == "__main__":
    main()

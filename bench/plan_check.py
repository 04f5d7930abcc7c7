"""Benchmark: the plan before a run (``freeal plan``) against the real run of the same config.

For each config: ``freeal plan CONFIG --json`` then ``freeal run CONFIG --quiet`` (each timed as a
whole command, model loading included), then the plan's stages beside the run folder's steps.
Give each config a fresh LLM cache (``llm.cache_path``) and run folder, or the run is not real.
One JSON per config in ``bench/results/plan_vs_run_<name>.json``. Run alone (2 cores).

    python bench/plan_check.py bench/configs/plan-sst2.yaml bench/configs/plan-bc5cdr.yaml

``--compare NAME PLAN_JSON PLAN_SECONDS RUN_SECONDS CONFIG`` only compares a plan and a run made
before with those commands (their wall times as measured then).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "freeal", *args], check=True)
    return time.perf_counter() - start


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def compare(name: str, plan_json: Path, plan_seconds: float, run_seconds: float, config: Path) -> dict:
    from freeal.cli import load_run_config

    plan = json.loads(plan_json.read_text())
    run_dir = load_run_config(config).out
    report = json.loads((run_dir / "report.json").read_text())
    steps = {"round 0 (every item)": report["rounds"][0]["llm"], "round 0 SLM": report["rounds"][0]["slm"]}
    for rd in report["rounds"][1:]:
        steps[f"round {rd['round']} refinery"], steps[f"round {rd['round']} SLM"] = rd["llm"], rd["slm"]
    stages = [
        {
            "stage": stage["name"],
            "plan_seconds": stage["seconds"],
            "real_seconds": (steps.get(stage["name"]) or {}).get("seconds"),
            "plan_calls": stage["calls"],
            "real_calls": ((steps.get(stage["name"]) or {}).get("llm_usage") or {}).get("calls"),
        }
        for stage in plan["stages"]
    ]
    totals = report["totals"]
    return {
        "name": name,
        "config": str(config),
        "items": plan["items"],
        "plan": plan,
        "plan_wall_seconds": plan_seconds,
        "real": {
            "wall_seconds": run_seconds,
            "steps_seconds": totals["seconds"],
            "llm_calls": totals["llm_calls"],
            "prompt_tokens": totals["prompt_tokens"],
            "evaluated_tokens": totals["evaluated_tokens"],
            "disk_mb": folder_mb(run_dir),
            "asked_share_per_round": [rd["llm"]["asked"] / plan["items"] for rd in report["rounds"][1:]],
        },
        "stages": stages,
        "plan_to_real_wall": plan["total"]["seconds"] / run_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--compare", nargs=5, metavar=("NAME", "PLAN_JSON", "PLAN_S", "RUN_S", "CONFIG"))
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    jobs = []
    if args.compare:
        name, plan_json, plan_s, run_s, config = args.compare
        jobs.append((name, Path(plan_json), float(plan_s), float(run_s), Path(config)))
    for config in args.configs:
        name = config.stem
        plan_json = RESULTS / f"plan_{name}.json"
        plan_s = timed(["plan", str(config), "--json", str(plan_json)])
        run_s = timed(["run", str(config), "--quiet"])
        jobs.append((name, plan_json, plan_s, run_s, config))
    for name, plan_json, plan_s, run_s, config in jobs:
        found = compare(name, plan_json, plan_s, run_s, config)
        (RESULTS / f"plan_vs_run_{name}.json").write_text(json.dumps(found, indent=2))
        print(
            f"{name}: plan {found['plan']['total']['seconds']:.0f} s (made in {plan_s:.0f} s), "
            f"run {run_s:.0f} s: plan/run {found['plan_to_real_wall']:.2f}"
        )


if __name__ == "__main__":
    main()

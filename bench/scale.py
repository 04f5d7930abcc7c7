"""freeal's own cost against the number of texts (issue 14), without any model.

Times :func:`freeal.demos.demonstration_groups` (group_size 32, k 10, a pool of 100 demonstrations
over 2 labels) and :func:`freeal.feedback.medoid_pool` (a clean set of 20% of the texts over 2
classes, size 100, as the loop calls them) on random 384-d float32 unit vectors, the shape of the
loop's sentence embeddings. Each (stage, n) runs in a fresh subprocess, so that one measurement's
peak memory cannot hide another's: ``peak_mb`` is the growth of the process's peak resident memory
during the call, over the inputs already in memory. The growth exponent is the slope of log time
against log n (1 is linear, 2 quadratic), over all sizes and over the two largest.

    python bench/scale.py                                  # n = 10,000, 100,000 and 1,000,000
    python bench/scale.py --sizes 10000 100000 --stages medoid_pool

writes ``bench/results/scale_algorithms.json`` and updates ``bench/results/scale_summary.json``
(``{stage: {"n": [...], "seconds": [...], "peak_mb": [...]}}``, other stages kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from freeal.llm.native import cpu_name

RESULTS = Path(__file__).parent / "results"
STAGES = ("demonstration_groups", "medoid_pool")
DIM = 384


def unit_vectors(n: int, seed: int) -> np.ndarray:
    """``n`` random unit vectors, float32, normalised in blocks so that no full-size temporary
    raises the peak memory measured afterwards."""
    vectors = np.random.default_rng(seed).standard_normal((n, DIM), dtype=np.float32)
    for start in range(0, n, 65_536):
        block = vectors[start : start + 65_536]
        block /= np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
    return vectors


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(stage: str, n: int, seed: int) -> tuple[Callable[[], Any], float]:
    """The call to time, on inputs built now, and the inputs' size in MB."""
    vectors = unit_vectors(n, seed)
    rng = np.random.default_rng(seed + 1)
    if stage == "demonstration_groups":
        from freeal.demos import demonstration_groups

        demo_vectors = unit_vectors(100, seed + 2)
        demo_labels = ["positive", "negative"] * 50
        return (
            lambda: demonstration_groups(vectors, demo_vectors, demo_labels, k=10, group_size=32, seed=0),
            vectors.nbytes / 2**20,
        )
    from freeal.feedback import medoid_pool

    labels = rng.choice(["positive", "negative"], size=n).tolist()
    candidates = np.sort(rng.choice(n, size=n // 5, replace=False))
    losses = rng.random(n)
    return lambda: medoid_pool(vectors, labels, candidates, losses, size=100, seed=0), vectors.nbytes / 2**20


def measure(stage: str, n: int, seed: int) -> dict:
    """One measurement, in this process (the parent runs each in a fresh one)."""
    call, input_mb = prepare(stage, n, seed)
    before = peak_rss_mb()
    start = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - start
    after = peak_rss_mb()
    return {
        "stage": stage,
        "n": n,
        "seconds": round(seconds, 3),
        "peak_mb": round(after - before, 1),
        "process_peak_mb": round(after, 1),
        "input_mb": round(input_mb, 1),
        "outputs": len(out),
    }


def run_one(stage: str, n: int, seed: int, timeout: float) -> dict:
    """:func:`measure` in a fresh interpreter; a run past ``timeout`` seconds is recorded as such."""
    command = [sys.executable, str(Path(__file__).resolve()), "--one", stage, str(n), "--seed", str(seed)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stage": stage, "n": n, "timed_out_after_s": timeout}
    if done.returncode:
        raise SystemExit(f"{stage} at n={n} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exponent(points: list[dict]) -> float | None:
    """Slope of log seconds against log n over the finished measurements (None under two)."""
    if len(points) < 2:
        return None
    slope = np.polyfit(np.log([p["n"] for p in points]), np.log([p["seconds"] for p in points]), 1)[0]
    return round(float(slope), 3)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the JSON files")
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.seed)))
        return

    measurements: list[dict] = []
    exponents: dict[str, float | None] = {}
    # above freeal's exact thresholds (20,000 texts to group, 2,000 candidates a class) the
    # algorithms change, so the slope over the two largest sizes is the one that tells the scaling
    top_exponents: dict[str, float | None] = {}
    for stage in args.stages:
        finished = []
        for n in sorted(args.sizes):
            point = run_one(stage, n, args.seed, args.timeout)
            print(json.dumps(point), flush=True)
            measurements.append(point)
            if "seconds" not in point:
                break  # larger sizes would only take longer
            finished.append(point)
        exponents[stage] = exponent(finished)
        top_exponents[stage] = exponent(finished[-2:])
    args.results.mkdir(parents=True, exist_ok=True)
    report = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "dim": DIM,
        "seed": args.seed,
        "measurements": measurements,
        "growth_exponent": exponents,
        "growth_exponent_largest_two": top_exponents,
    }
    (args.results / "scale_algorithms.json").write_text(json.dumps(report, indent=2) + "\n")
    summary_path = args.results / "scale_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for stage in args.stages:
        points = [p for p in measurements if p["stage"] == stage and "seconds" in p]
        summary[stage] = {
            "n": [p["n"] for p in points],
            "seconds": [p["seconds"] for p in points],
            "peak_mb": [p["peak_mb"] for p in points],
        }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({"growth_exponent": exponents, "growth_exponent_largest_two": top_exponents}))


if __name__ == "__main__":
    main()

"""Fault figures: a small FreeAL run SIGKILLed at random moments and resumed, and reader fuzzing.

``kills``: an uninterrupted run (SmolLM2-135M, a small TREC slice, every stage of the loop) gives
the reference labels and LLM calls. Then the same run, in a fresh folder and cache, is started in
a child process and SIGKILLed after a random delay, again and again, until an attempt finishes by
itself; such trials repeat until the kills add up. Every answer the LLM computes is logged (by a
counting wrapper, before the cache stores it), so the benchmark sees calls repeated across kills:
an answer lost between its computation and its commit is paid again, everything committed never
is. The final labels must equal the reference.

``fuzz``: the hypothesis properties of tests/test_fuzz.py with many more examples, reporting how
many inputs each tried (every one must end in a result or one FreeALError naming the file).

    python bench/faults.py kills --kills 20      # writes bench/results/faults_kills.json
    python bench/faults.py fuzz --examples 3000  # writes bench/results/faults_fuzz.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PYTEST = [sys.executable, "-m", "pytest", "-q"]
# attempts of one trial killed before it counts as never finishing (trials have taken 1-10 kills:
# 5-10 with every delay within 12 s, 1-2 with delays spread over the whole run)
MAX_ATTEMPTS = 60


class Counting:
    """The real annotator; each answer it computes is appended to ``log`` (one line, flushed)."""

    def __init__(self, inner, log: Path) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.identity, self.supports_grammar = inner, inner.identity, inner.supports_grammar
        self.log = log.open("a", buffering=1)

    def _count(self, prompts, stream):  # type: ignore[no-untyped-def]
        for i, answer in stream:
            self.log.write(hashlib.sha256(json.dumps(prompts[i]).encode()).hexdigest()[:16] + "\n")
            yield i, answer

    def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
        return self._count(prompts, self.inner.score_many(prompts, labels))

    def generate_many(self, prompts, **kw):  # type: ignore[no-untyped-def]
        return self._count(prompts, self.inner.generate_many(prompts, **kw))


def child(folder: Path, limit: int, quick: bool) -> None:
    """One attempt: run (or resume) the loop in ``folder``: written demonstrations, the initial round
    with them and 2 refinery rounds (``quick``, for the test suite: a zero-shot start and one
    refinery round). ``min_kappa`` -1 keeps refinery in: SmolLM2's answers on 24 texts agree with its
    SLM far below the default floor, which would end the loop after the first feedback step and
    leave refinery's steps out of the kills."""
    from freeal.config import LoopConfig, SLMConfig
    from freeal.data import read_items
    from freeal.llm.cache import CachedAnnotator, CallCache
    from freeal.llm.llamacpp import LlamaCppAnnotator
    from freeal.llm.models import resolve_model
    from freeal.loop import FreeAL
    from freeal.tasks import load_task

    task = load_task(DATA / "trec")
    items = read_items(DATA / "trec" / "train.jsonl", task=task, limit=limit, seed=1)
    path, name = resolve_model("smollm2-135m")
    inner = Counting(LlamaCppAnnotator(path, name=name, n_ctx=1024), folder / "calls.log")
    annotator = CachedAnnotator(inner, CallCache(folder / "cache.sqlite"))
    loop = LoopConfig(
        demos_per_label=2,
        demos_per_call=2,
        max_calls_per_label=8,
        k=6,
        group_size=12,
        initial_demos="none" if quick else "generated",
        refinery_rounds=1 if quick else 2,
        min_change=0,
        min_kappa=-1,
    )
    slm = SLMConfig(mode="head", epochs=6, warmup_epochs=2, device="cpu")
    FreeAL(task, slm=slm, loop=loop, run_dir=folder / "run", annotator=annotator, progress=False).fit(items)


def attempt(folder: Path, limit: int, quick: bool, kill_after: float | None) -> tuple[bool, float]:
    """Start a child; SIGKILL it after ``kill_after`` seconds. Returns (finished by itself, seconds)."""
    start = time.perf_counter()
    # the child's log goes to a file: a pipe nobody reads while waiting blocks a child that logs
    # more than 64 KB, which would then look like a run that never finished
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - read after the child ends
    proc = subprocess.Popen(
        [sys.executable, __file__, "child", "--folder", str(folder), "--limit", str(limit)]
        + (["--quick"] if quick else []),
        stdout=subprocess.DEVNULL,
        stderr=log,
        text=True,
    )
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return False, time.perf_counter() - start
    if proc.returncode != 0:
        log.seek(0)
        raise SystemExit(f"attempt failed (exit {proc.returncode}): {log.read()[-3000:]}")
    return True, time.perf_counter() - start


def labels(folder: Path) -> list:
    return [json.loads(line)["label"] for line in (folder / "run" / "labels.jsonl").read_text().splitlines()]


def kills(n_kills: int, limit: int, seed: int, quick: bool = False, max_delay: float = 12.0) -> dict:
    """Trials in fresh folders: each attempt is SIGKILLed after a random delay (up to ``max_delay``
    seconds, start-up included) until one finishes by itself; trials go on until ``n_kills`` kills
    have landed. Every trial must end with the reference labels.

    ``max_delay`` is raised to 1.25 times the uninterrupted run's time where that is longer: an
    attempt that resumes a finished-but-for-the-end run still pays the start-up (imports, model,
    report), and on a machine where that alone outlasts ``max_delay`` no attempt could ever finish
    (10 s against 9 on a 2-core AMD EPYC with torch 2.13). A trial's first delay is drawn within
    the uninterrupted run's time, so no trial goes unkilled. ``MAX_ATTEMPTS`` per trial turns any
    other never-ending trial into an error instead of a hang."""
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="freeal-faults-"))
    reference = scratch / "reference"
    reference.mkdir()
    _, reference_seconds = attempt(reference, limit, quick, None)
    reference_calls = (reference / "calls.log").read_text().split()
    max_delay = max(max_delay, 1.25 * reference_seconds)
    print(
        f"reference: {len(reference_calls)} LLM calls in {reference_seconds:.1f} s; "
        f"kills after 1-{max_delay:.1f} s",
        flush=True,
    )
    trials = []
    while sum(t["kills"] for t in trials) < n_kills:
        folder = scratch / f"trial-{len(trials)}"
        folder.mkdir()
        delays: list[float] = []
        finished = False
        while not finished:
            if len(delays) == MAX_ATTEMPTS:
                raise SystemExit(f"trial {len(trials) + 1}: {MAX_ATTEMPTS} attempts killed: {delays} s")
            # a trial's first kill lands within the uninterrupted run's time, so every trial is
            # killed at least once; later ones may outlast the rest of the run, so it can finish
            bound = max_delay if delays else min(max_delay, reference_seconds)
            finished, seconds = attempt(folder, limit, quick, rng.uniform(1.0, bound))
            if not finished:
                delays.append(round(seconds, 2))
        calls = (folder / "calls.log").read_text().split()
        trial = {
            "kills": len(delays),
            "kill_delays_seconds": delays,
            "calls": len(calls),
            "calls_repeated": sum(c - 1 for c in Counter(calls).values() if c > 1),
            "labels_identical": labels(folder) == labels(reference),
        }
        trials.append(trial)
        print(f"trial {len(trials)}: {json.dumps(trial)}", flush=True)
    result = {
        "slice": f"trec train, random {limit} (seed 1); SmolLM2-135M",
        "stages": "zero-shot start, 1 refinery round" if quick else "demos, initial round, 2 refinery rounds",
        "min_kappa": -1,
        "kills": sum(t["kills"] for t in trials),
        "trials": trials,
        "reference_calls": len(reference_calls),
        "calls_repeated": sum(t["calls_repeated"] for t in trials),
        "labels_identical": all(t["labels_identical"] for t in trials),
        "reference_seconds": reference_seconds,
        "max_delay_seconds": max_delay,
    }
    print(json.dumps(result, indent=2), flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def fuzz(examples: int) -> dict:
    env = {**os.environ, "FREEAL_FUZZ_EXAMPLES": str(examples)}
    start = time.perf_counter()
    done = subprocess.run(
        [
            *PYTEST,
            str(ROOT / "tests" / "test_fuzz.py"),
            "--hypothesis-show-statistics",
            "-p",
            "no:cacheprovider",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    out = done.stdout
    per_test = {}
    for name, block in re.findall(r"\n(tests/test_fuzz\.py::\S+):\n(.*?)(?=\n\S|\Z)", out, flags=re.S):
        counts = [int(n) for n in re.findall(r"(\d+) passing", block)]
        per_test[name.split("::")[1]] = sum(counts)
    result = {
        "examples_per_property": examples,
        "inputs_tried": per_test,
        "total_inputs": sum(per_test.values()),
        "passed": done.returncode == 0,
        "seconds": time.perf_counter() - start,
        "pytest_tail": out.strip().splitlines()[-1] if out.strip() else done.stderr[-500:],
    }
    print(json.dumps(result, indent=2), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kills")
    k.add_argument("--kills", type=int, default=20)
    k.add_argument("--limit", type=int, default=24)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--max-delay", type=float, default=12.0)
    k.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults_kills.json")
    f = sub.add_parser("fuzz")
    f.add_argument("--examples", type=int, default=3000)
    f.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "faults_fuzz.json")
    c = sub.add_parser("child")
    c.add_argument("--folder", type=Path, required=True)
    c.add_argument("--limit", type=int, required=True)
    c.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.what == "child":
        child(args.folder, args.limit, args.quick)
        return
    if args.what == "kills":
        result = kills(args.kills, args.limit, args.seed, max_delay=args.max_delay)
    else:
        result = fuzz(args.examples)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

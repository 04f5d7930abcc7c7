"""Demonstration writing against a served model: how many requests wait on one another, timed.

A served model (OpenAI, vLLM) answers requests concurrently, so a writer that sends one prompt per
request pays every answer's latency in a row. The server here is the loopback one of the tests
(``tests/openai_server.py``), answering each request after ``--latency`` seconds with numbered
texts that are new each time; the task is TREC's six labels, the style texts its first train
questions (texts only). ``generate_demonstrations`` writes ``--per-label`` texts per label, fresh
cache. Run it once with each checkout on ``PYTHONPATH`` (``--tag`` names the result): today's
rounds (each label drawing its style texts from a stream of its own) against one prompt per
request, the code before rounds (commit ``aab05ad``; rounds were first tried in ``243f9fc`` and
reverted, BENCHMARKS.md); what differs is the request pattern, not the texts' quality.

    python bench/demo_rounds.py --tag rounds_own_streams --out bench/results/demo_rounds.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

from freeal.data import read_jsonl
from freeal.demos import generate_demonstrations
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.native import cpu_name
from freeal.llm.openai_compat import OpenAICompatAnnotator
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT / "tests"))
from openai_server import FakeOpenAIServer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the server takes per answer")
    parser.add_argument("--per-label", type=int, default=16)
    parser.add_argument("--per-call", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8, help="the annotator's max_concurrency")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    task = load_task(DATA / "trec")
    style = [row["text"] for row in itertools.islice(read_jsonl(DATA / "trec" / "train.jsonl"), 200)]
    numbers = itertools.count()

    def write(users: list[str]) -> str:
        return "\n".join(f"{k + 1}. Written question number {next(numbers)}?" for k in range(args.per_call))

    with FakeOpenAIServer(policy=write, latency=args.latency) as server, tempfile.TemporaryDirectory() as tmp:
        annotator = CachedAnnotator(
            OpenAICompatAnnotator("m", server.url, max_concurrency=args.concurrency),
            CallCache(Path(tmp) / "cache.sqlite"),
        )
        start = time.perf_counter()
        demos, report = generate_demonstrations(
            task, annotator, style, per_label=args.per_label, per_call=args.per_call
        )
        seconds = time.perf_counter() - start
        result = {
            "tag": args.tag,
            "labels": len(task.label_names),
            "per_label": args.per_label,
            "per_call": args.per_call,
            "latency_s": args.latency,
            "calls": report.calls,
            "kept": len(demos),
            "server_requests": server.requests,
            "most_in_flight": server.max_in_flight,
            "seconds": round(seconds, 2),
            "latencies_in_a_row": round(seconds / args.latency, 2),
            "cpu": cpu_name(),
        }
    print(json.dumps(result))
    if args.out:
        old = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps([*[r for r in old if r["tag"] != args.tag], result], indent=1) + "\n")


if __name__ == "__main__":
    main()

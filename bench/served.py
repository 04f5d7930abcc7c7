"""A served model against the embedded one: the same GGUF, the same texts, the same machine.

Starts ``freeal serve MODEL`` (llama-cpp-python's OpenAI-compatible server) on loopback, labels the
texts through it twice — asking the whole answer (``score_tokens`` = ``max_tokens`` = 16, how freeal
asked before) and asking 4 answer tokens (``score_tokens``; the default then, 1 now) — then with
the embedded backend (batched label scoring), each through a fresh cache, one after another so
that nothing shares the cores. With ``--llama-server PATH`` the served side is llama.cpp's own
server binary instead (``--parallel`` slots decoded together), asked one request at a time and
then ``--parallel`` at once, with each ``--score-tokens`` count. Reports seconds per text, answer
tokens per text, and how far the labels and probabilities agree with the embedded ones.

    python bench/served.py --model qwen2.5-coder-1.5b --data ../shared/data/sst2 --n 100
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from freeal.annotate import annotate
from freeal.data import read_items
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.llamacpp import LlamaCppAnnotator
from freeal.llm.models import resolve_model
from freeal.llm.openai_compat import OpenAICompatAnnotator
from freeal.tasks import load_task

RESULTS = Path(__file__).parent / "results"


def launch(command: list[str], url: str, what: str) -> subprocess.Popen:
    """Start a server and return it once ``url`` answers 200 (loading a model takes a while).

    Its log goes to an unnamed temporary file, not a pipe: nobody reads a pipe while the benchmark
    runs, and a server that logs every request (llama-server does) fills the pipe's 64 KB and then
    blocks on its next log line, so every request times out (how the first 8-slot run stalled).
    """
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the server's lifetime, not a block's
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"{what} exited: {log.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer in time")


def start_server(model: str, port: int, threads: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "freeal", "serve", model, "--port", str(port), "--n-ctx", "2048"]
    command += ["--threads", str(threads)]
    return launch(command, f"http://127.0.0.1:{port}/v1/models", "freeal serve")


def start_llama_server(
    binary: Path, model: str, port: int, threads: int, parallel: int, unified: bool
) -> subprocess.Popen:
    """llama.cpp's ``llama-server`` on the same GGUF, with ``parallel`` slots of 2,048 tokens each.

    ``unified``: one KV buffer for all slots. With a buffer per slot llama.cpp cuts a batch over
    several slots into steps taking equally many tokens from each, so tails of unequal length cost
    a step each (what freeal's own scoring context works around, BENCHMARKS issue 13).
    """
    path, _ = resolve_model(model)
    command = [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port)]
    command += ["-t", str(threads), "-c", str(2048 * parallel), "--parallel", str(parallel)]
    command += ["--kv-unified" if unified else "--no-kv-unified"]
    return launch(command, f"http://127.0.0.1:{port}/health", "llama-server")


def timed(task, items, inner) -> dict:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as tmp:
        annotator = CachedAnnotator(inner, CallCache(Path(tmp) / "c.sqlite"))
        start = time.perf_counter()
        frame = annotate(task, items, annotator, progress=False)
        seconds = time.perf_counter() - start
    led = annotator.ledger
    right = np.mean([a == g for a, g in zip(frame["label"], items.gold, strict=True)])
    return {
        "seconds_per_text": round(seconds / len(items), 4),
        "requests": led.calls,
        "answer_tokens_per_text": round(led.completion_tokens / len(items), 2),
        "accuracy": round(float(right), 4),
        "_labels": frame["label"].tolist(),
        "_probs": [[p[k] for k in task.label_names] if p else None for p in frame["probs"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/sst2"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's server binary, served instead")
    parser.add_argument("--parallel", type=int, default=8, help="llama-server's slots")
    parser.add_argument("--kv-unified", action="store_true", help="llama-server: one KV buffer for all slots")
    parser.add_argument(
        "--score-tokens",
        type=int,
        nargs="+",
        default=[1],
        help="llama-server: answer tokens, each tried (freeal asks 1)",
    )
    args = parser.parse_args()
    task = load_task(args.data)
    items = read_items(args.data / "test.jsonl", task=task, limit=args.n, seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if args.llama_server:
        proc = start_llama_server(
            args.llama_server, args.model, port, args.threads, args.parallel, args.kv_unified
        )
        asks = [
            (f"llama-server, {k} at once, {tokens} answer tokens", tokens, k)
            for tokens in args.score_tokens
            for k in dict.fromkeys([1, args.parallel])
        ]
    else:
        proc = start_server(args.model, port, args.threads)
        asks = [("served, whole answer (16 tokens)", 16, 1), ("served, 4 answer tokens", 4, 1)]
    runs: dict[str, dict] = {}
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for name, tokens, concurrency in asks:
            inner = OpenAICompatAnnotator(args.model, url, max_concurrency=concurrency, score_tokens=tokens)
            runs[name] = timed(task, items, inner)
            print(name, {k: v for k, v in runs[name].items() if not k.startswith("_")}, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    path, name = resolve_model(args.model)
    runs["embedded, batched"] = timed(task, items, LlamaCppAnnotator(path, name=name, n_threads=args.threads))
    print("embedded", {k: v for k, v in runs["embedded, batched"].items() if not k.startswith("_")})
    base = runs["embedded, batched"]
    for run in runs.values():
        run["labels_equal_to_embedded"] = sum(
            a == b for a, b in zip(run["_labels"], base["_labels"], strict=True)
        )
        gaps = [
            abs(x - y)
            for p, q in zip(run["_probs"], base["_probs"], strict=True)
            if p and q
            for x, y in zip(p, q, strict=True)
        ]
        run["max_probability_gap_to_embedded"] = round(max(gaps), 6) if gaps else None
    out = {
        "model": args.model,
        "data": f"{args.data.name} test, {args.n} random texts (seed 0)",
        "threads": args.threads,
        "server": (
            f"llama-server, {args.parallel} slots, "
            + ("one KV buffer" if args.kv_unified else "a KV buffer per slot")
            if args.llama_server
            else "freeal serve"
        ),
        "runs": {k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in runs.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    server = f"_llama-server_{args.parallel}{'u' if args.kv_unified else ''}" if args.llama_server else ""
    target = RESULTS / f"served_{args.data.name}_{args.n}{server}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Issue 14: the whole loop at growing N against an OpenAI-compatible server that answers at once,
so what is timed is freeal's own work.

The server (``tests/openai_server.py``) runs in a process of its own and answers from a fixed rule
on the text (a small sentiment lexicon), with first-token logprobs. It closes each connection after
its answer (HTTP/1.0); ``--keep-alive`` keeps them open between requests, as real servers do
(measured: no faster for freeal's side at 10k, BENCHMARKS.md). Texts are SST-2's and MR's train
sentences, repeated with a numbered suffix where N asks for more. Embeddings (MiniLM, for the loop
and the SLM, a ``head`` on sentence vectors; for the SLM handed back, the default's logistic
regression on MiniLM's layer means, or with ``--deployed head`` a head as in the runs recorded
before that became the default, whose vectors are stored the same way) are computed before the
timed run and read from the disk cache inside it, so embedding time is excluded, as the issue
asks. Each size runs in a fresh process (and its embeddings in one before it), so no size's
memory is left in another's figures. Per step of the run (the ``step ...`` lines of ``say``): wall
seconds and the peak resident memory sampled every 50 ms; ``base_mb`` is the process's memory
before the run starts (interpreter, torch, the encoder's configuration), so what the run itself
holds is ``peak_mb - base_mb``. That sum counts a shared page once per mapping of it (at 1M the
main process mapped the vectors file twice and the fold worker once); ``peak_anon_mb`` (and
``base_anon_mb``) is the anonymous part alone, the memory the processes allocated themselves,
whatever the vectors take.

    python bench/scale_loop.py --sizes 10000 100000 1000000 --summary \
        --out bench/results/scale_loop_linear.json

``--rerun`` redoes the sizes given and keeps ``--out``'s runs of the others (a size whose run was
disturbed, redone alone). With ``--summary`` the invocation also puts its stages into
``bench/results/scale_summary.json`` as ``loop <stage>`` (seconds summed over the rounds, peak
resident MB of the whole process), replacing the entries there: asked for, so that a check at one
size cannot overwrite the three sizes' record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.data import read_items
from freeal.embed import Embedder, encoder_path
from freeal.llm.native import cpu_name
from freeal.loop import FreeAL
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
SUMMARY = ROOT / "bench" / "results" / "scale_summary.json"
DATA = ROOT.parent / "shared" / "data"
SERVER = """
import sys, time
sys.path.insert(0, {tests!r})
from openai_server import FakeOpenAIServer
POSITIVE = ("good", "great", "best", "fun", "love", "beautiful", "funny", "moving", "fine", "enjoy")
def policy(messages):
    text = messages[-1].lower()
    return "positive" if any(w in text for w in POSITIVE) else "negative"
server = FakeOpenAIServer(labels=["negative", "positive"], policy=policy, keep_alive={keep_alive}).start()
server.bodies = type("Forget", (), {{"append": staticmethod(lambda body: None)}})()
print(server.url, flush=True)
while True:
    time.sleep(60)
"""


def proc_text(path: Path) -> str:
    """A ``/proc`` file's text, or ``""`` when its thread or process ended after it was listed (a
    request thread, a fold worker): the sampler reads while both come and go."""
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def memory_mb() -> tuple[float, float]:
    """Resident memory of this process and of its children (the SLM's fold workers), in MB: all of
    it (``VmRSS``), and the anonymous part (``RssAnon``: what the processes allocated themselves).
    The first counts a shared page (the memory-mapped vectors, the libraries) once per mapping of
    it, an upper bound; the second leaves out every file-backed page, the vectors among them, and no
    anonymous page is shared (a worker is a fresh interpreter, not a fork)."""
    pids = ["self"]
    for task in Path("/proc/self/task").iterdir():
        pids += proc_text(task / "children").split()
    rss = anon = 0
    for pid in pids:
        fields = dict(line.split(":", 1) for line in proc_text(Path(f"/proc/{pid}/status")).splitlines())
        rss += int(fields.get("VmRSS", "0 kB").split()[0])
        anon += int(fields.get("RssAnon", "0 kB").split()[0])
    return rss / 1024, anon / 1024


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used: the loopback server's share of the 2 cores,
    which the loop's wall time includes but which is no work of freeal's."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def distinct() -> list[str]:
    """SST-2's and MR's train sentences, each once."""
    return list(
        dict.fromkeys(
            [
                *read_items(DATA / "sst2" / "train.jsonl", label_col=None).texts,
                *read_items(DATA / "mr" / "train.jsonl", label_col=None).texts,
            ]
        )
    )


def texts_for(n: int) -> list[str]:
    base = distinct()
    return [base[i % len(base)] + ("" if i < len(base) else f" ({i // len(base)})") for i in range(n)]


def embed(n: int, pooling: str = "sentence") -> float:
    """Seconds to put the texts' MiniLM vectors (``pooling``'s) into the disk cache (a read when
    already there).

    The distinct sentences are encoded; a numbered repeat (sizes above them) gets its sentence's
    vector nudged by a little noise and renormalised (cosine about 0.98 to it), stored with
    :meth:`~freeal.embed.Embedder.store` instead of encoded: embedding is no part of what is timed,
    and MiniLM would take about 95 minutes for a million texts on 2 cores."""
    start = time.perf_counter()
    embedder = Embedder(encoder_path("all-minilm-l6-v2"), device="cpu", pooling=pooling)  # type: ignore[arg-type]
    texts = texts_for(n)
    base = distinct()
    if n <= len(base):
        embedder.encode(texts)
        return time.perf_counter() - start
    vectors = np.asarray(embedder.encode(base))

    def chunks() -> Iterator[np.ndarray]:
        for at in range(0, n, Embedder.CHUNK):
            rows = np.arange(at, min(n, at + Embedder.CHUNK))
            scale = 0.2 / math.sqrt(vectors.shape[1])
            noise = np.random.default_rng(at).normal(0, scale, (len(rows), vectors.shape[1]))
            chunk = vectors[rows % len(base)] + np.where(rows[:, None] < len(base), 0, noise)
            yield (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)).astype(np.float32)

    embedder.store(texts, chunks())
    return time.perf_counter() - start


def run(n: int, url: str, scratch: Path, deployed: str) -> dict:
    task = load_task(DATA / "sst2")
    texts = texts_for(n)
    base, base_anon = memory_mb()
    stages: dict[str, dict] = {}
    current = {"name": "start", "t": time.perf_counter()}
    stop = threading.Event()

    def stage(name: str) -> dict:
        return stages.setdefault(name, {"seconds": 0.0, "peak_mb": 0.0, "peak_anon_mb": 0.0})

    def say(message: str) -> None:
        if message.startswith("step "):
            now = time.perf_counter()
            stage(current["name"])["seconds"] += now - current["t"]
            step = message.removeprefix("step ")
            current.update(name="deployed slm" if step == "final/slm" else step.split("/")[-1], t=now)

    def sample() -> None:
        while not stop.is_set():
            entry = stage(current["name"])
            rss, anon = memory_mb()
            entry["peak_mb"] = max(entry["peak_mb"], rss)
            entry["peak_anon_mb"] = max(entry["peak_anon_mb"], anon)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    llm = LLMConfig(
        backend="openai", base_url=url, model="fake", max_concurrency=16, cache_path=scratch / f"{n}.sqlite"
    )
    slm = SLMConfig(backbone="all-minilm-l6-v2")
    # The server's lexicon answers are ones the SLM reproduces at a kappa near 0.5, under a
    # classifier's default floor (0.6), where the loop would stop after round 0's feedback; the
    # floor every record before it ran under (0.2) keeps a refinery round in what is timed.
    loop = LoopConfig(deployed_mode=deployed, min_kappa=0.2)  # type: ignore[arg-type]
    runner = FreeAL(
        task, llm, slm, loop, run_dir=scratch / f"run{n}", progress=False, say=say,
    )  # fmt: skip
    start = time.perf_counter()
    runner.fit(texts)
    total = time.perf_counter() - start
    say("step end")
    stop.set()
    sampler.join()
    stages.pop("end", None)
    rounds = len(runner.report_["rounds"])
    result = {
        "n": n,
        "base_mb": base,
        "loop_seconds": total,
        "rounds": rounds,
        "ms_per_text_per_round": 1000 * total / n / rounds,
        "peak_mb": max(s["peak_mb"] for s in stages.values()),
        "base_anon_mb": base_anon,
        "peak_anon_mb": max(s["peak_anon_mb"] for s in stages.values()),
        "llm_requests": runner.report_["totals"]["llm_calls"],
        "kappa": [(r["feedback"] or {}).get("kappa") for r in runner.report_["rounds"]],
        "stages": stages,
    }
    return result


def summarise(results: list[dict]) -> None:
    """The issue's summary format, ``{"loop <stage>": {"n": [...], "seconds": [...], "peak_mb": [...]}}``,
    merged into the algorithms' entries that ``bench/scale.py`` writes."""
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    stages = dict.fromkeys(name for r in results for name in r["stages"] if name != "start")
    for name in [*stages, "total"]:
        summary[f"loop {name}"] = {
            "n": [r["n"] for r in results],
            "seconds": [
                r["loop_seconds"] if name == "total" else r["stages"][name]["seconds"] for r in results
            ],
            "peak_mb": [r["peak_mb"] if name == "total" else r["stages"][name]["peak_mb"] for r in results],
        }
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")


def child(*args: str) -> dict:
    """The last line of this script run with ``args`` in a fresh process, as JSON."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 30_000])
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--rerun", action="store_true", help="keep --out's runs of other sizes (to redo one size alone)"
    )
    parser.add_argument(
        "--keep-alive",
        action="store_true",
        help="the server keeps connections open between requests (HTTP/1.1), as real servers do; "
        "by default it closes each after its answer (HTTP/1.0), as in the recorded runs",
    )
    parser.add_argument(
        "--deployed",
        choices=["head", "linear"],
        default="linear",
        help="the SLM handed back: the default's logistic regression on layer means, or a head on the "
        "stored sentence vectors (as in the runs recorded before it became the default)",
    )
    parser.add_argument(
        "--summary", action="store_true", help="also write the stages into bench/results/scale_summary.json"
    )
    parser.add_argument("--embed", type=int, help=argparse.SUPPRESS)  # a child: embed N texts
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # a child: N, server URL, scratch
    args = parser.parse_args()
    if args.embed:
        seconds = embed(args.embed)
        if args.deployed == "linear":
            seconds += embed(args.embed, "layers")
        print(json.dumps({"seconds": seconds}))
        return
    if args.one:
        print(json.dumps(run(int(args.one[0]), args.one[1], Path(args.one[2]), args.deployed)))
        return
    if args.out is None:
        parser.error("--out is needed")
    code = SERVER.format(tests=str(ROOT / "tests"), keep_alive=args.keep_alive)
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        kept = json.loads(args.out.read_text())["runs"] if args.rerun and args.out.is_file() else []
        results = [r for r in kept if r["n"] not in args.sizes]
        with tempfile.TemporaryDirectory() as scratch:
            for n in args.sizes:
                embedding = child("--embed", str(n), "--deployed", args.deployed)["seconds"]
                server_start = cpu_seconds(server.pid)
                result = child("--one", str(n), url, scratch, "--deployed", args.deployed)
                server_cpu = cpu_seconds(server.pid) - server_start
                result.update(
                    embedding_seconds_excluded=embedding,
                    server_cpu_seconds=server_cpu,
                    ms_per_text_per_round_without_llm_stage=1000
                    * (result["loop_seconds"] - result["stages"]["llm"]["seconds"])
                    / n
                    / result["rounds"],
                )
                results = sorted([*results, result], key=lambda r: r["n"])
                print(json.dumps({k: v for k, v in result.items() if k != "stages"}), flush=True)
                growth = {}
                if len(results) > 1:
                    a, b = results[-2], results[-1]
                    growth = {
                        key: math.log(b[key] / a[key]) / math.log(b["n"] / a["n"])
                        for key in ("loop_seconds", "peak_mb")
                    }
                    growth["run_mb"] = math.log(
                        (b["peak_mb"] - b["base_mb"]) / (a["peak_mb"] - a["base_mb"])
                    ) / math.log(b["n"] / a["n"])
                payload = {
                    "machine": cpu_name(),
                    "deployed_mode": args.deployed,
                    "server_keeps_connections": args.keep_alive,
                    "runs": results,
                    "growth_exponent_last_two": growth,
                }
                args.out.write_text(json.dumps(payload, indent=1) + "\n")
                if args.summary:
                    summarise(results)
    finally:
        server.kill()


if __name__ == "__main__":
    main()

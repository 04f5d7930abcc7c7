"""Label scoring against the machine's own prefill ceiling, on the prompts of a real FreeAL run.

For each model, in one process on the same threads: the raw prefill rate of llama.cpp in 512-token
batches (the ceiling) and in 32-token batches; then freeal's evaluated tokens per second while it
labels, through the same code a run uses (:func:`freeal.annotate.label_groups` behind a fresh
cache): a zero-shot pass over the run's texts, every LLM round of the run folder rebuilt from its
``groups.jsonl`` (the same demonstrations per group), and one text per call on a part of the
zero-shot pass (the way freeal scored before batching). Tokens per labeled text come from the same
passes: one zero-shot pass, and the whole loop (every LLM round, plus the demonstrations the run
wrote, read from its step files). Each pass is held to the ceiling measured right before and
after it, and the overall ratio weights the passes by their time.

    python bench/speed.py RUN_FOLDER [RUN_FOLDER ...] --models qwen2.5-coder-1.5b qwen2.5-coder-0.5b

writes ``bench/results/speed_<cpu>.json`` and updates ``bench/results/speed_summary.json`` (the latest
machine's figures per model, and each machine's under ``by_cpu``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from freeal.annotate import label_groups
from freeal.data import read_jsonl
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.llamacpp import LlamaCppAnnotator
from freeal.llm.models import resolve_model
from freeal.llm.native import build_info, cpu_name
from freeal.tasks import task_from_dict

RESULTS = Path(__file__).parent / "results"


def ceiling(annotator: LlamaCppAnnotator, batch: int, repeats: int = 3) -> float:
    """Raw prefill tokens per second of 512 tokens in ``batch``-token batches (the best of a few)."""
    llm = annotator.llm
    text = llm.tokenize(("the quick brown fox jumps over the lazy dog " * 120).encode(), add_bos=False)[:512]
    before, llm.n_batch = llm.n_batch, batch
    best = 0.0
    for _ in range(repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(text)
        best = max(best, len(text) / (time.perf_counter() - start))
    llm.n_batch = before
    llm.reset()
    return best


def timed_pass(annotator: LlamaCppAnnotator, task, texts, groups) -> dict:  # type: ignore[no-untyped-def]
    """Label ``texts`` in ``groups`` through a fresh cache, as a run does; time and tokens, and the
    ceiling measured right before and right after: on a shared virtual machine the ceiling itself
    drifted by 10-40% within one process (BENCHMARKS.md), so each pass is held to its own."""
    before = ceiling(annotator, 512, repeats=2)
    with tempfile.TemporaryDirectory() as tmp:
        cached = CachedAnnotator(annotator, CallCache(Path(tmp) / "c.sqlite"))
        start = time.perf_counter()
        frame = label_groups(task, texts, cached, groups, progress=False)
        seconds = time.perf_counter() - start
    around = (before + ceiling(annotator, 512, repeats=2)) / 2
    led = cached.ledger
    return {
        "texts": int(frame["asked"].sum()),
        "calls": led.calls,
        "seconds": round(seconds, 2),
        "evaluated_tokens": led.evaluated_tokens,
        "prompt_tokens": led.prompt_tokens,
        "tps": round(led.evaluated_tokens / seconds, 2),
        "ceiling_around_tps": round(around, 2),
        "to_ceiling": round(led.evaluated_tokens / seconds / around, 3),
    }


def one_per_call(annotator: LlamaCppAnnotator, task, texts) -> dict:  # type: ignore[no-untyped-def]
    from freeal.llm.prompts import classification_prompt

    start = time.perf_counter()
    answers = [annotator.score(classification_prompt(task, t), task.label_names) for t in texts]
    seconds = time.perf_counter() - start
    evaluated = sum(a.evaluated_tokens for a in answers)
    return {"texts": len(texts), "seconds": round(seconds, 2), "tps": round(evaluated / seconds, 2)}


def run_rounds(folder: Path) -> list[tuple[str, Path]]:
    """The run's LLM steps that labeled texts, in order (zero-shot first when present)."""
    steps = sorted(folder.glob("round-*/llm"), key=lambda p: int(p.parent.name.split("-")[1]))
    if (folder / "zero-shot").is_dir():
        steps.insert(0, folder / "zero-shot")
    return [(str(p.relative_to(folder)), p) for p in steps if (p / "groups.jsonl").is_file()]


def bench_run(annotator: LlamaCppAnnotator, folder: Path, single: int) -> dict:
    run = json.loads((folder / "run.json").read_text())
    task = task_from_dict(run["task"])
    if task.kind != "classification":
        raise SystemExit(f"{folder}: label scoring is for classification runs (this is {task.kind})")
    items = read_jsonl(folder / "items.jsonl")
    texts = [r["text"] for r in items]
    position = {r["id"]: i for i, r in enumerate(items)}
    out: dict = {"run": str(folder), "task": task.name, "texts": len(texts), "steps": {}}
    out["steps"]["zero-shot pass"] = timed_pass(annotator, task, texts, [(np.arange(len(texts)), [])])
    out["one text per call"] = one_per_call(annotator, task, texts[:single])
    zero_key = json.dumps([list(range(len(texts))), [[]]])
    loop_tokens = 0
    for name, step in run_rounds(folder):
        if name == "zero-shot":  # the run's own zero-shot baseline: the pass above
            continue
        rows = read_jsonl(step / "groups.jsonl")
        groups = [
            (
                np.asarray([position[i] for i in g["items"]]),
                [(d["text"], d["label"]) for d in g["demonstrations"]],
            )
            for g in rows
        ]
        key = json.dumps([sorted(int(i) for m, _ in groups for i in m), [d for _, d in groups]])
        if key == zero_key:  # an initial round without demonstrations is the zero-shot pass
            out["steps"][name] = {"same prompts as the zero-shot pass": True}
            loop_tokens += out["steps"]["zero-shot pass"]["evaluated_tokens"]
            continue
        out["steps"][name] = timed_pass(annotator, task, texts, groups)
        loop_tokens += out["steps"][name]["evaluated_tokens"]
    written = generated = 0
    for step in [*folder.glob("demos*/step.json"), *folder.glob("round-*/demos*/step.json")]:
        usage = json.loads(step.read_text()).get("llm_usage", {})
        written += usage.get("evaluated_tokens", 0)
        generated += usage.get("completion_tokens", 0)
    zero = out["steps"]["zero-shot pass"]
    out["demonstration writing (recorded)"] = {"evaluated_tokens": written, "generated_tokens": generated}
    out["zero_shot_tokens_per_text"] = round(zero["evaluated_tokens"] / len(texts), 2)
    out["loop_tokens_per_text"] = round((loop_tokens + written) / len(texts), 2)
    out["loop_to_zero_shot"] = round((loop_tokens + written) / zero["evaluated_tokens"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="finished classification run folders")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"])
    parser.add_argument("--single", type=int, default=100, help="texts scored one per call, for comparison")
    parser.add_argument("--tag", default=None, help="names the result file (default: the CPU)")
    args = parser.parse_args()
    cpu = cpu_name()
    result: dict = {"cpu": cpu, "build": build_info(), "models": {}}
    for model in args.models:
        path, name = resolve_model(model)
        annotator = LlamaCppAnnotator(path, name=name, n_ctx=4096)
        entry: dict = {"threads": annotator.n_threads, "batch_tokens": annotator.batch_tokens}
        entry["ceiling_tps"] = round(ceiling(annotator, 512), 2)
        entry["prefill_32_tps"] = round(ceiling(annotator, 32), 2)
        entry["runs"] = [bench_run(annotator, folder, args.single) for folder in args.runs]
        entry["ceiling_after_tps"] = round(ceiling(annotator, 512), 2)  # how far the machine drifted
        scoring = [s for r in entry["runs"] for s in r["steps"].values() if "tps" in s]
        tokens = sum(s["evaluated_tokens"] for s in scoring)
        entry["scoring_tps"] = round(tokens / sum(s["seconds"] for s in scoring), 2)
        # each pass against the ceiling measured around it, weighted by the pass's time
        entry["scoring_to_ceiling"] = round(
            tokens / sum(s["seconds"] * s["ceiling_around_tps"] for s in scoring), 3
        )
        single = [r["one text per call"] for r in entry["runs"]]
        entry["one_per_call_tps"] = round(
            sum(s["tps"] * s["seconds"] for s in single) / sum(s["seconds"] for s in single), 2
        )
        result["models"][model] = entry
        print(json.dumps({model: {k: v for k, v in entry.items() if k != "runs"}}), flush=True)
        del annotator
    tag = args.tag or cpu.lower().replace(" ", "-").replace("(r)", "").replace("/", "-")[:40]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"speed_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    summary_path = RESULTS / "speed_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for model, entry in result["models"].items():
        runs = entry["runs"]
        # the latest machine's figures at the top level (the shape), every machine's by CPU
        by_cpu = summary.get(model, {}).get("by_cpu", {})
        latest = {
            "ceiling_tps": entry["ceiling_tps"],
            "scoring_tps": entry["scoring_tps"],
            "scoring_to_ceiling": entry["scoring_to_ceiling"],
            "one_per_call_tps": entry["one_per_call_tps"],
            "zero_shot_tokens_per_text": {r["task"]: r["zero_shot_tokens_per_text"] for r in runs},
            "loop_tokens_per_text": {r["task"]: r["loop_tokens_per_text"] for r in runs},
            "loop_to_zero_shot": {r["task"]: r["loop_to_zero_shot"] for r in runs},
            "cpu": cpu,
        }
        summary[model] = {**latest, "by_cpu": {**by_cpu, cpu: latest}}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

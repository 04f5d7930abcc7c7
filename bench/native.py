"""Benchmark: llama.cpp's extra weight buffers on and off, on this CPU (speed and answers).

For every installed embedded model, each setting is loaded in a fresh child process (as `freeal
doctor` does) and timed on prefill in 512- and 32-token batches; the rounds alternate the order of
the two settings so neither always runs on a warmer machine. Then the 1.5B scores the same test
texts zero-shot with the buffers on and with them off (no cache), to show whether the setting
changes any answer. A setting that crashes (the buffers on an AMX Xeon) is recorded as crashed and
not tried again, and the answers are then not compared. Run alone: llama.cpp on 2 cores slows badly
beside other work.

    python bench/native.py --rounds 3 --texts 100
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np

from freeal.data import read_items
from freeal.llm.llamacpp import LlamaCppAnnotator
from freeal.llm.models import MODELS, resolve_model
from freeal.llm.native import build_info, cpu_flags, cpu_name, extra_buffers_decision, run_child
from freeal.llm.prompts import classification_prompt
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def speeds(rounds: int) -> dict:
    out: dict = {}
    for name in MODELS:
        path, _ = resolve_model(name)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        crashed: dict[str, str] = {}
        for r in range(rounds):
            order = ("on", "off") if r % 2 == 0 else ("off", "on")
            for setting in order:
                if setting in crashed:
                    continue
                found = run_child(path, extra_buffers=setting == "on", speed=True)
                if "crashed" in found:  # recorded, not fatal: on an AMX Xeon the buffers crash
                    crashed[setting] = found["crashed"]
                    print(f"{name}, extra buffers {setting}: crashed ({found['crashed']})", flush=True)
                else:
                    runs[setting].append(found)
        out[name] = {
            setting: {"crashed": crashed[setting]}
            if setting in crashed
            else {
                key: {
                    "median": statistics.median(f[key] for f in found),
                    "runs": [round(f[key], 2) for f in found],
                }
                for key in ("prefill_512_tps", "prefill_32_tps", "load_seconds")
            }
            for setting, found in runs.items()
        }
        for setting, found in out[name].items():
            if "crashed" not in found:
                print(
                    f"{name}, extra buffers {setting}: 512-batch {found['prefill_512_tps']['median']:.1f} "
                    f"tok/s, 32-batch {found['prefill_32_tps']['median']:.1f}",
                    flush=True,
                )
    return out


def answers(model: str, n: int) -> dict:
    """The same zero-shot prompts scored with the buffers on and off."""
    task = load_task(DATA / "sst2")
    items = read_items(DATA / "sst2" / "test.jsonl", task=task, limit=n, seed=0)
    path, name = resolve_model(model)
    scores = {}
    seconds = {}
    for setting in ("on", "off"):
        annotator = LlamaCppAnnotator(path, name=name, extra_buffers=setting)  # type: ignore[arg-type]
        start = time.perf_counter()
        found = [
            annotator.score(classification_prompt(task, t), task.label_names).scores for t in items.texts
        ]
        seconds[setting] = time.perf_counter() - start
        scores[setting] = np.asarray(found, dtype=np.float64)
        del annotator
    same = (scores["on"].argmax(1) == scores["off"].argmax(1)).mean()
    diff = np.abs(scores["on"] - scores["off"]).max()
    print(f"{model}: {same:.1%} of {n} labels equal; largest log-score difference {diff:.2e}", flush=True)
    return {
        "model": model,
        "texts": n,
        "data": "sst2 test, random slice (seed 0)",
        "labels_equal_share": float(same),
        "max_abs_log_score_diff": float(diff),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    flags = cpu_flags()
    chosen, why = extra_buffers_decision("auto")
    result = {
        "cpu": cpu_name(),
        "flags": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in flags],
        "machine": platform.machine(),
        **build_info(),
        "auto_extra_buffers": {"on": chosen, "why": why},
        "speed": speeds(args.rounds),
    }
    if not any("crashed" in found for found in result["speed"]["qwen2.5-coder-1.5b"].values()):
        result["answers"] = answers("qwen2.5-coder-1.5b", args.texts)  # both settings load in this process
    slug = re.sub(r"[^a-z0-9]+", "-", f"{cpu_name()}-{'avx512' if 'avx512f' in flags else 'avx2'}".lower())
    out = args.out or ROOT / "bench" / "results" / f"native_{slug.strip('-')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

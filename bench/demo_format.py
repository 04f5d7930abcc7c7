"""Benchmark: where demonstrations go in a classification prompt, inline or as earlier chat turns.

Refinery shows each group of texts its nearest clean demonstrations. They can sit in the one user
message before the text (``inline``: "Text: … Label: …" blocks, freeal's format) or as earlier
turns of the chat, each demonstration a user turn answered by an assistant turn holding its label
(``turns``: how NER's demonstrations go in). This compares both with no demonstrations at all
(``zero``), on the same texts, the same groups and the same demonstrations. (The loop with
``turns`` is measured in BENCHMARKS.md: level labels, worse confidence, so not adopted.)

Texts: a random ``--n`` of the quality protocol's 1,000-text train slice (``--slice-seed``), so
their zero-shot answers serve ``bench/quality.py`` from the same cache. Demonstrations: a disjoint
pool of 2,000 other train texts with their **gold** labels, grouped as the loop groups them (k
nearest to each group's centroid, balanced, groups of 32). Gold demonstrations are an upper bound
on the clean set (97.5–100% right on the sentiment sets, BENCHMARKS.md): this measures the
format, not the feedback step. Gold is otherwise used only to score. ``inline`` and ``zero`` are
the library's own prompt (:func:`freeal.llm.prompts.classification_prompt`); ``turns`` is built here.

    python bench/demo_format.py --datasets sst2 mr trec --n 300 --cache DIR/cache.sqlite
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import freeal.annotate
from freeal.annotate import label_groups
from freeal.config import LLMConfig
from freeal.data import read_items, read_jsonl
from freeal.demos import demonstration_groups
from freeal.embed import Embedder
from freeal.llm import make_annotator
from freeal.llm.base import Message
from freeal.llm.native import cpu_name
from freeal.llm.prompts import answered_turns, classification_prompt, system_prompt
from freeal.tasks import Task, load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def turns(task: Task, text: str, demonstrations: Sequence[tuple[str, str]] = ()) -> list[Message]:
    """Each demonstration a user turn answered by an assistant turn holding its label."""
    return [
        {"role": "system", "content": system_prompt(task)},
        *answered_turns(demonstrations, lambda d: f"Text: {d}\nLabel:"),
        {"role": "user", "content": f"Text: {text}\nLabel:"},
    ]


def run_one(dataset: str, n: int, k: int, slice_seed: int, cache: Path) -> dict:
    task = load_task(DATA / dataset)
    items = read_items(DATA / dataset / "train.jsonl", task=task, limit=1000, seed=slice_seed)
    # a random n of the slice: the slice keeps the file's order, and MR's file is sorted by label
    chosen = np.sort(np.random.default_rng(slice_seed).permutation(len(items))[:n])
    texts = [items.texts[i] for i in chosen]
    gold = [items.gold[i] for i in chosen]
    in_slice = set(items.texts)
    rest = [r for r in read_jsonl(DATA / dataset / "train.jsonl") if r["text"] not in in_slice]
    pool = [rest[i] for i in np.random.default_rng(slice_seed + 1).permutation(len(rest))[:2000]]
    embedder = Embedder()
    vectors, pool_vectors = embedder.encode(texts), embedder.encode([r["text"] for r in pool])
    grouped = demonstration_groups(vectors, pool_vectors, [r["label"] for r in pool], k=k, group_size=32)
    with_demos = [(m, [(pool[j]["text"], pool[j]["label"]) for j in d]) for m, d in grouped]
    annotator = make_annotator(LLMConfig(cache_path=cache))
    result: dict = {
        "dataset": dataset,
        "texts": n,
        "k": k,
        "slice": f"random {n} of the protocol's seed-{slice_seed} slice",
    }
    for name, build, groups in (
        ("zero", classification_prompt, [(np.arange(n), [])]),
        ("inline", classification_prompt, with_demos),
        ("turns", turns, with_demos),
    ):
        # label_groups builds each prompt with this name: swapped here for turns, so grouping,
        # calibration and batched scoring are the library's own and only the format differs
        freeal.annotate.classification_prompt = build  # type: ignore[assignment]
        calls, start = annotator.ledger.calls, time.perf_counter()
        frame = label_groups(task, texts, annotator, groups, calibrate="auto", progress=False)
        plain = [task.label_names[int(np.argmax(s))] for s in frame["log_scores"]]
        result[name] = {
            "accuracy": float(np.mean([a == g for a, g in zip(frame["label"], gold, strict=True)])),
            "calibrated": bool(frame.attrs["calibrated"]),
            "accuracy_plain": float(np.mean([a == g for a, g in zip(plain, gold, strict=True)])),
            "seconds": round(time.perf_counter() - start, 1),
            "llm_calls": annotator.ledger.calls - calls,
        }
        print(dataset, name, result[name], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["sst2", "mr", "trec"])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--slice-seed", type=int, default=0)
    parser.add_argument(
        "--cache", type=Path, required=True, help="LLM cache (shared with bench/quality.py's --keep)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "demo_format.json")
    args = parser.parse_args()
    runs = [run_one(d, args.n, args.k, args.slice_seed, args.cache) for d in args.datasets]
    args.out.write_text(
        json.dumps({"machine": cpu_name(), "model": LLMConfig().model, "runs": runs}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()

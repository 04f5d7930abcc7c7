"""Issue 13: demonstration writing on long texts, timed.

Style texts are long medical texts: runs of ``--sentences`` consecutive BC5CDR train sentences
(PubMed abstracts, about 250 tokens each). The task is the Medical Abstracts data set's five
classes. ``generate_demonstrations`` writes ``--per-label`` texts per label with the 1.5B (fresh
cache); the step's time, calls and tokens are recorded. Run it once with the code under test and
once with an older checkout on ``PYTHONPATH`` to compare (``--tag`` names the result).

    python bench/demo_writing.py --tag bounded --out bench/results/demo_writing.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from freeal.config import LLMConfig
from freeal.data import read_sentences
from freeal.demos import generate_demonstrations
from freeal.llm import make_annotator
from freeal.llm.native import cpu_name
from freeal.tasks import task_from_dict

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
TASK = task_from_dict(
    {
        "name": "medical-abstracts",
        "description": "The disease class a medical abstract is about.",
        "labels": {
            "neoplasms": "cancers and tumours",
            "digestive system diseases": "diseases of the stomach, bowel, liver or pancreas",
            "nervous system diseases": "diseases of the brain, nerves or spinal cord",
            "cardiovascular diseases": "diseases of the heart or blood vessels",
            "general pathological conditions": "any other disease or condition",
        },
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", required=True)
    parser.add_argument("--sentences", type=int, default=10)
    parser.add_argument("--texts", type=int, default=150)
    parser.add_argument("--per-label", type=int, default=4)
    parser.add_argument("--per-call", type=int, default=4)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sentences = read_sentences(DATA / "bc5cdr" / "train.jsonl").texts
    step = args.sentences
    style = [" ".join(sentences[i : i + step]) for i in range(0, step * args.texts, step)]
    with tempfile.TemporaryDirectory() as scratch:
        annotator = make_annotator(LLMConfig(model=args.model, cache_path=Path(scratch) / "c.sqlite"))
        start = time.perf_counter()
        demos, report = generate_demonstrations(
            TASK, annotator, style, per_label=args.per_label, per_call=args.per_call, seed=0
        )
        seconds = time.perf_counter() - start
    ledger = annotator.ledger
    result = {
        "tag": args.tag,
        "machine": cpu_name(),
        "model": args.model,
        "style_texts": len(style),
        "style_words_mean": float(np.mean([len(t.split()) for t in style])),
        "per_label": args.per_label,
        "per_call": args.per_call,
        "seconds": seconds,
        "calls": report.calls,
        "written": report.written,
        "kept": report.kept,
        "kept_per_label": report.per_label,
        "kept_words_mean": float(np.mean([len(t.split()) for t, _ in demos])) if demos else None,
        "evaluated_tokens": ledger.evaluated_tokens,
        "completion_tokens": ledger.completion_tokens,
        "examples": [{"label": label, "text": text} for text, label in demos[:: max(1, len(demos) // 5)]],
    }
    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    runs = [r for r in runs if r["tag"] != args.tag] + [result]
    args.out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)


if __name__ == "__main__":
    main()

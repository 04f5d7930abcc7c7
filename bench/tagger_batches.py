"""The fine-tuned NER tagger's training time and quality, on labels corrupted as an LLM might.

BC5CDR train sentences whose gold entity lists are corrupted (40% of the sentences with entities:
their entities dropped or their types swapped, as ``tests/test_ner.py`` does), the tagger trained on
them with the loop's default settings on the CPU, then scored: seconds to fit, entity F1 on test
sentences, and its clean split against the corruption (share of clean-flagged sentences left
uncorrupted). Gold only makes the noise and scores. Run it on two versions of freeal (e.g. with
``PYTHONPATH`` at an older checkout's ``src``) to compare how the trainer batches.

    python bench/tagger_batches.py --seeds 0 1 --tag similar-lengths
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import freeal
from freeal.config import SLMConfig
from freeal.data import read_sentences
from freeal.llm.native import cpu_name
from freeal.metrics import ner_report
from freeal.ner import spans_from_tags, tags_from_spans
from freeal.slm.tagger import SLMTagger
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def corrupted(gold: list[list[str]], seed: int) -> tuple[list[list[str]], np.ndarray]:
    """Tags with 40% of the sentences that hold entities corrupted, and which ones were."""
    rng = np.random.default_rng(seed)
    out, mask = [], np.zeros(len(gold), dtype=bool)
    for k, tags in enumerate(gold):
        spans = spans_from_tags(tags)
        if spans and rng.random() < 0.4:
            mask[k] = True
            swapped = [("Disease" if t == "Chemical" else "Chemical", a, b) for t, a, b in spans]
            spans = [] if rng.random() < 0.5 else swapped
        out.append(tags_from_spans(len(tags), spans))
    return out, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--test-limit", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tag", required=True)
    args = parser.parse_args()
    task = load_task(DATA / "bc5cdr")
    test = read_sentences(DATA / "bc5cdr" / "test.jsonl", task=task, limit=args.test_limit, seed=0)
    result: dict = {
        "machine": cpu_name(),
        "freeal": str(Path(freeal.__file__).parent),
        "tag": args.tag,
        "settings": "SLMConfig(device='cpu') defaults: fine-tuned all-minilm-l6-v2 tagger",
        "train": args.limit,
        "test": len(test),
        "runs": [],
    }
    for seed in args.seeds:
        train = read_sentences(DATA / "bc5cdr" / "train.jsonl", task=task, limit=args.limit, seed=seed)
        noisy, mask = corrupted(train.gold, seed)  # type: ignore[arg-type]
        start = time.perf_counter()
        tagger = SLMTagger(task.label_names, SLMConfig(device="cpu", seed=seed)).fit(train.tokens, noisy)
        seconds = time.perf_counter() - start
        clean = tagger.clean_mask_
        run = {
            "seed": seed,
            "fit_seconds": round(seconds, 1),
            "test_f1": ner_report(test.gold, tagger.predict(test.tokens))["f1"],
            "clean_share": float(clean.mean()),
            "clean_right": float((~mask)[clean].mean()),
            "noisy_right": float((~mask)[~clean].mean()) if (~clean).any() else None,
            "right": float((~mask).mean()),
        }
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    out = ROOT / "bench" / "results" / f"tagger_batches_{args.tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Probe (issue 12): would another held-out SLM make better final labels? On issue 12's 9 kept quality
runs (``bench/quality.py --keep DIR``): the last round's LLM probabilities, the held-out (5-fold)
predictions of logistic regressions on the cached sentence vectors trained on those labels (hard, or
soft: each text once per label weighted by the LLM's probability), and the final label
LLM x SLM^0.5 as the loop makes it. Gold only to score; no model is run but the cached encoders.

    python bench/final_slm_probe.py --runs DIR --out bench/results/final_slm_probe.json
"""

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold

from freeal.embed import Embedder, encoder_path

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=Path, required=True)
parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()


def rows(p):
    return [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]


def combine(llm: np.ndarray, slm: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The loop's final rule: the label of LLM x SLM^weight."""
    return (np.log(llm + 1e-9) + weight * np.log(slm + 1e-9)).argmax(1)


out = {}
for ds in ("sst2", "mr", "trec"):
    for seed in (0, 1, 2):
        run = args.runs / f"default_{ds}_1000_s{seed}"
        items = rows(run / "items.jsonl")
        texts = [r["text"] for r in items]
        train = rows(args.data / ds / "train.jsonl")
        names = json.loads((args.data / ds / "task.json").read_text())["labels"]
        names = list(names) if isinstance(names, dict) else names
        gold = np.array([names.index(train[int(r["id"])]["label"]) for r in items])
        llm = rows(run / "round-2/llm/labels.jsonl")
        L = np.array([[r["probs"][n] for n in names] for r in llm])
        y = L.argmax(1)
        P = np.array([[r["probs"][n] for n in names] for r in rows(run / "round-2/slm/predictions.jsonl")])
        final = np.array([names.index(r["label"]) for r in rows(run / "labels.jsonl")])
        mp = np.asarray(Embedder(encoder_path("all-mpnet-base-v2")).encode(texts))
        ml = np.asarray(Embedder(encoder_path(None)).encode(texts))
        feats = {"mpnet": mp, "mpnet+minilm": np.hstack([mp, ml])}
        res = {
            "llm": float((y == gold).mean()),
            "final_saved": float((final == gold).mean()),
            "default_slm": float((P.argmax(1) == gold).mean()),
            "final_default": float((combine(L, P) == gold).mean()),
        }
        for fname, X in feats.items():
            for C in (0.3, 1.0, 3.0):
                for soft in (False, True):
                    Q = np.zeros_like(L)
                    for tr, te in KFold(5, shuffle=True, random_state=0).split(X):
                        if soft:  # each text once per label, weighted by the LLM's probability
                            k = L.shape[1]
                            Xs = np.repeat(X[tr], k, axis=0)
                            ys = np.tile(np.arange(k), len(tr))
                            ws = L[tr].ravel()
                            m = LogisticRegression(C=C, max_iter=2000).fit(Xs, ys, sample_weight=ws)
                        else:
                            m = LogisticRegression(C=C, max_iter=2000).fit(X[tr], y[tr])
                        q = np.full((len(te), L.shape[1]), 1e-6)
                        q[:, m.classes_] = m.predict_proba(X[te])
                        Q[te] = q / q.sum(1, keepdims=True)
                    tag = f"{fname} C={C}{' soft' if soft else ''}"
                    res[f"slm {tag}"] = float((Q.argmax(1) == gold).mean())
                    res[f"final {tag}"] = float((combine(L, Q) == gold).mean())
        out[f"{ds}_s{seed}"] = res
        print(
            ds, seed, {k: round(v, 3) for k, v in res.items() if k.startswith(("llm", "final"))}, flush=True
        )
args.out.write_text(json.dumps(out, indent=1) + "\n")
keys = [k for k in next(iter(out.values()))]
for ds in ("sst2", "mr", "trec"):
    sub = [v for k, v in out.items() if k.startswith(ds)]
    print(ds, " ".join(f"{k}:{np.mean([s[k] for s in sub]):.4f}" for k in keys))

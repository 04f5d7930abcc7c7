"""Probe (issue 12): two more opinions beside the zero-shot LLM, on one classification slice each.

The loop's final label multiplies the LLM's probabilities with a held-out SLM's, and gains where the
two err on different texts. Two candidates for an opinion that costs little more, tried here on the
zero-shot answers alone (no loop), against the same rule with a logistic regression on mpnet's
sentence vectors (what the loop's SLM amounts to, ``bench/final_slm_probe.py``):

- ``hidden``: the 1.5B's own final hidden state at the answer position of freeal's zero-shot prompt
  (read in the same decode as the label scores, llama.cpp's embeddings switched on in the scoring
  context), as the features of a cross-fitted logistic regression on the LLM's labels;
- ``variant``: a second prompt, the labels as lettered options in reversed order, its answers
  calibrated by the same ``auto`` rule, averaged with the first prompt's (a prompt ensemble).

Gold only to score. ``--keep`` holds the LLM cache and each slice's arrays (``hidden_*.npz``,
``variant_*.npz``), so a second call only scores. Run alone (llama.cpp on 2 cores).

    python bench/second_opinion.py --datasets mr --seeds 0 --limit 1000 --keep DIR
"""

from __future__ import annotations

import argparse
import json
import string
import time
from pathlib import Path

import llama_cpp
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

import freeal.llm.llamacpp as llamacpp
from freeal.annotate import annotate, choose_calibration, decide
from freeal.config import LLMConfig
from freeal.data import Items, read_items
from freeal.embed import Embedder, mpnet_path
from freeal.llm import make_annotator
from freeal.llm.base import log_softmax
from freeal.llm.native import cpu_name
from freeal.llm.prompts import CONTENT_FREE_INPUTS, classification_prompt
from freeal.tasks import Task, load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HIDDEN: dict[tuple[int, ...], np.ndarray] = {}  # prompt tokens -> hidden state at its last token


class HiddenStateScorer(llamacpp.SharedPrefixScorer):
    """freeal's scorer with llama.cpp's embeddings on: the same label scores (within 2e-6 on 40
    SST-2 texts), and each prompt's last hidden state kept in :data:`HIDDEN`. llama.cpp then outputs
    every token of a batch: 48 s against 40 s for those 40 texts on the AMD EPYC."""

    def _fit(self, longest: int) -> None:
        original = llama_cpp.llama_init_from_model

        def with_embeddings(model, params):
            params.embeddings = True
            params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_NONE
            return original(model, params)

        llama_cpp.llama_init_from_model = with_embeddings
        try:
            super()._fit(longest)
        finally:
            llama_cpp.llama_init_from_model = original
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm._model.model)

    def _decode_chunk(self, prompts, chunk, targets):
        self.read: list[np.ndarray] = []
        answers = super()._decode_chunk(prompts, chunk, targets)
        # the first reads are the members' last tail tokens, in the answers' order
        for (i, _, _), state in zip(answers, self.read[: len(answers)], strict=True):
            HIDDEN[tuple(prompts[i])] = state
        return answers

    def _logprobs(self, index: int) -> np.ndarray:
        raw = llama_cpp.llama_get_embeddings_ith(self.ctx, index)
        self.read.append(np.ctypeslib.as_array(raw, shape=(self.n_embd,)).copy())
        return super()._logprobs(index)


def lettered_prompt(task: Task, text: str) -> list[dict]:
    """The second prompt: options A, B, ... in reversed label order, the text last (shared prefix)."""
    names = list(reversed(task.label_names))
    options = "\n".join(f"{string.ascii_uppercase[k]}) {n}: {task.labels[n]}" for k, n in enumerate(names))
    return [
        {
            "role": "system",
            "content": f"You are an expert annotator. Task: {task.description}\nOptions:\n{options}\n"
            "Answer with the letter of the option that describes the text, and nothing else.",
        },
        {"role": "user", "content": f"Text: {text}\nOption:"},
    ]


def probabilities(frame_probs, names: list[str]) -> np.ndarray:
    return np.asarray([[r[n] for n in names] for r in frame_probs], dtype=np.float64)


def ask(task: Task, items: Items, keep: Path, tag: str, ways: list[str]) -> None:
    """The LLM's part: freeal's zero-shot answers (with hidden states) and the second prompt's; none
    of it (not even loading the model) when the slice's arrays are kept."""
    wanted = [way for way in ways if not (keep / f"{way}_{tag}.npz").exists()]
    if not wanted:
        return
    if "hidden" in wanted:  # only then: llama.cpp outputs every token with embeddings on
        llamacpp.SharedPrefixScorer = HiddenStateScorer  # type: ignore[misc]
    annotator = make_annotator(LLMConfig(cache_path=keep / "cache.sqlite"))
    names = task.label_names
    t = time.time()
    texts = items.texts
    frame = annotate(task, items, annotator, progress=False)
    p0 = probabilities(frame["probs"], names)
    if "hidden" in wanted:
        keys = [tuple(annotator.inner.render(classification_prompt(task, x))) for x in texts]
        missing = [x for x, k in zip(texts, keys, strict=True) if k not in HIDDEN]
        if missing:  # answered from the cache: scored again, past it, for their hidden states
            for _ in annotator.inner.score_many([classification_prompt(task, x) for x in missing], names):
                pass
        np.savez(keep / f"hidden_{tag}.npz", hidden=np.stack([HIDDEN[k] for k in keys]), probs=p0)
    if "variant" in wanted:
        letters = list(string.ascii_uppercase[: len(names)])
        free = annotator.score_many([lettered_prompt(task, x) for x in CONTENT_FREE_INPUTS], letters)
        offsets = np.mean([log_softmax(a.scores) for _, a in free], axis=0).tolist()
        found = dict(annotator.score_many([lettered_prompt(task, x) for x in texts], letters))
        answers = [found[i] for i in range(len(texts))]
        on = choose_calibration(answers, letters, [offsets] * len(answers))
        rows = [decide(a, letters, offsets if on else None)[2] for a in answers]
        reverse = list(reversed(names))
        p1 = np.asarray([[r[reverse.index(n)] for n in names] for r in rows])
        np.savez(keep / f"variant_{tag}.npz", p0=p0, p1=p1)
    print(f"{tag}: LLM part {time.time() - t:.0f} s", flush=True)


def crossfit(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Held-out (5-fold) probabilities of a logistic regression on standardized ``x`` fit to ``y``."""
    out = np.zeros((len(y), int(y.max()) + 1))
    for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(x, y):
        scaler = StandardScaler().fit(x[train])
        model = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x[train]), y[train])
        out[test] = model.predict_proba(scaler.transform(x[test]))
    return out


def score(texts: list[str], gold: np.ndarray, keep: Path, tag: str, ways: list[str]) -> dict:
    def acc(logp: np.ndarray) -> float:
        return round(float((logp.argmax(1) == gold).mean()), 4)

    def fused(logp: np.ndarray, slm: np.ndarray, w: float) -> float:
        return acc(logp + w * np.log(slm + 1e-12))

    mpnet = Embedder(mpnet_path()).encode(texts)
    arrays = {way: np.load(keep / f"{way}_{tag}.npz") for way in ways}
    # both ways keep the same zero-shot answers (one annotate call on one cache)
    p0 = arrays["hidden"]["probs"] if "hidden" in arrays else arrays["variant"]["p0"]
    lp0, y = np.log(p0 + 1e-12), p0.argmax(1)
    baseline: dict = {"zero_shot": acc(lp0)}
    for c in (0.001, 0.01):
        slm = crossfit(mpnet, y, c)
        baseline[f"mpnet_C{c}"] = {
            "slm": acc(np.log(slm + 1e-12)),
            "x_slm^0.5": fused(lp0, slm, 0.5),
            "x_slm^1": fused(lp0, slm, 1),
        }
    out: dict = {}
    for way in ways:
        res = dict(baseline)
        if way == "hidden":
            for c in (0.001, 0.01, 0.1):
                slm = crossfit(arrays["hidden"]["hidden"], y, c)
                res[f"hidden_C{c}"] = {
                    "slm": acc(np.log(slm + 1e-12)),
                    "agreement_with_llm": round(float((slm.argmax(1) == y).mean()), 4),
                    "x_slm^0.5": fused(lp0, slm, 0.5),
                    "x_slm^1": fused(lp0, slm, 1),
                }
        else:
            lp1 = np.log(arrays["variant"]["p1"] + 1e-12)
            both = lp0 + 0.5 * lp1
            apart = y != lp1.argmax(1)
            res["variant"] = acc(lp1)
            res["disagree"] = int(apart.sum())
            res["zero_shot_right_where_they_disagree"] = round(float((y == gold)[apart].mean()), 3)
            res["ensemble_0.5"] = acc(both)
            res["ensemble_1"] = acc(lp0 + lp1)
            for c in (0.001, 0.01):
                slm = crossfit(mpnet, both.argmax(1), c)
                res[f"ensemble_0.5_x_mpnet_C{c}"] = {
                    "x_slm^0.5": fused(both, slm, 0.5),
                    "x_slm^1": fused(both, slm, 1),
                }
        out[way] = res
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mr"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--ways", nargs="+", choices=["hidden", "variant"], default=["hidden", "variant"])
    parser.add_argument("--keep", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        task = load_task(DATA / dataset)
        for seed in args.seeds:
            items = read_items(DATA / dataset / "train.jsonl", task=task, limit=args.limit, seed=seed)
            tag = f"{dataset}_{seed}_{args.limit}"
            ask(task, items, args.keep, tag, args.ways)
            gold = np.asarray([task.label_names.index(g) for g in items.gold])
            result = {
                "dataset": dataset,
                "seed": seed,
                "slice": f"train: random {len(items)} (seed {seed})",
                "model": "qwen2.5-coder-1.5b",
                "cpu": cpu_name(),
                **score(items.texts, gold, args.keep, tag, args.ways),
            }
            path = args.results / f"second_opinion_{tag}.json"
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

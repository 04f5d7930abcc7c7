"""Issue 12: the knobs first tuned on single 500-text slices, re-checked on the multi-slice protocol
from the run folders that ``bench/quality.py --keep DIR`` leaves (no model runs; gold only to score).

Per run folder (one data set, one seed), what its saved answers say exactly:

- **calibration** (``LLMConfig.calibrate``): the zero-shot labels decided from the raw label scores
  plainly, calibrated with the content-free offsets, and as the gold-free ``auto`` rule picks
  (:func:`freeal.annotate.choose_calibration`), which is what the run used;
- **refined_label**, and calibration in refinery: the LLM's labels after refinery round 1 merged
  ``combined`` (the label the earlier and the new answer's probabilities make most probable
  together) or ``new`` (the new answer as it stands), each with the new answers calibrated per
  group of demonstrations (the content-free offsets of its prompts) or plain. Round 1 asks the same
  prompts under any of these, so this is exact for round 1; from round 2 on the runs would diverge
  (another SLM, another noisy set), which only a run measures (``bench/quality.py --override``);
- **min_change / refinery_rounds**: the share of labels each refinery round changed, and the final
  labels had the loop stopped after each round (the same combination with that round's SLM, the
  same kappa check), which is what ``refinery_rounds`` or a ``min_change`` above that share gives.

    python bench/knobs.py --runs /tmp/q --out bench/results/knobs_1000.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from freeal.annotate import choose_calibration, decide
from freeal.config import LoopConfig
from freeal.data import read_items, read_jsonl
from freeal.kinds import kind_of
from freeal.llm.base import LabelScores
from freeal.loop import agreement_kappa, final_slm_weight
from freeal.report import score
from freeal.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def step(folder: Path) -> dict:
    return json.loads((folder / "step.json").read_text())


def offsets_by_item(folder: Path) -> dict[str, list[float]]:
    """Each asked item's content-free offsets (those of its group of demonstrations)."""
    return {
        item: group["offsets"]
        for group in read_jsonl(folder / "groups.jsonl")
        if group.get("offsets")
        for item in group["items"]
    }


def merged(
    rows: list[dict],
    previous: list[dict],
    offsets: dict[str, list[float]] | None,
    rule: str,
    labels: list[str],
) -> list[str | None]:
    """A refinery round's labels had its answers been decided with ``offsets`` (None: plainly) and
    merged by ``rule`` (``Classification.merge``: ``combined`` takes the label the earlier and the new
    probabilities make most probable together, ``new`` the new answer's); not asked: kept. The
    zero-shot pass is the case of no earlier answers (``previous`` labels None) and rule ``new``."""
    out = []
    for row, old in zip(rows, previous, strict=True):
        if not row.get("asked") or row.get("log_scores") is None:
            out.append(old["label"])
            continue
        answer = LabelScores(label=row["label"], scores=row["log_scores"])
        label, _, probs = decide(answer, labels, None if offsets is None else offsets.get(row["id"]))
        if rule == "combined" and probs is not None and isinstance(old.get("probs"), dict):
            joint = np.asarray([old["probs"][n] for n in labels]) * np.asarray(probs)
            label = labels[int(np.argmax(joint))]
        out.append(label)
    return out


def replay(run_dir: Path) -> dict:
    """The knobs' effects in one kept run folder (see the module docstring)."""
    dataset, limit, seed = run_dir.name.split("_")[-3:]
    task = load_task(DATA / dataset)
    items = read_items(DATA / dataset / "train.jsonl", task=task, limit=int(limit), seed=int(seed[1:]))
    kind = kind_of(task)
    labels = task.label_names

    def accuracy(predicted: list) -> float:
        return score(kind.score(items.gold, predicted))

    def with_ids(name: str) -> list[dict]:
        rows = read_jsonl(run_dir / name / "labels.jsonl")
        return [{"id": i, **row} for i, row in zip(items.ids, rows, strict=True)]

    zero = with_ids("zero-shot")
    offsets = offsets_by_item(run_dir / "zero-shot")
    unanswered = [{"label": None}] * len(zero)
    plain, calibrated = (merged(zero, unanswered, o, "new", labels) for o in (None, offsets))
    answers = [LabelScores(label=r["label"], scores=r["log_scores"]) for r in zero if r.get("log_scores")]
    auto = choose_calibration(answers, labels, [offsets.get(r["id"]) for r in zero if r.get("log_scores")])
    # the run's settings, not its final step's weight (0 there if its last round failed the kappa check)
    settings = LoopConfig(**json.loads((run_dir / "run.json").read_text())["loop"])
    weight = final_slm_weight(settings, None)
    last = step(run_dir / "final")["round"]
    rounds = []
    round0 = previous = with_ids("round-0/llm")
    for r in range(1, last + 1):
        rows = with_ids(f"round-{r}/llm")
        fits = read_jsonl(run_dir / f"round-{r}/slm/predictions.jsonl")
        # exact for round 1 only (later rounds' prompts depend on the earlier merges)
        variants = None
        if r == 1:
            group_offsets = offsets_by_item(run_dir / f"round-{r}/llm")
            variants = {
                f"{rule}, {way}": accuracy(merged(rows, previous, chosen, rule, labels))
                for rule in ("combined", "new")
                for way, chosen in (("calibrated per group", group_offsets), ("plain", None))
            }
        kappa = agreement_kappa([row["label"] for row in rows], [f["predicted"] for f in fits])
        stopped, _ = kind.combine(items, [(rows, fits)], final_slm_weight(settings, kappa))
        rounds.append(
            {
                "round": r,
                "asked": int(sum(bool(row.get("asked")) for row in rows)),
                "changed_share": step(run_dir / f"round-{r}/llm")["changed_share"],
                "llm_combined": accuracy([row["label"] for row in rows]),
                "llm_if_round_1_were": variants,
                "final_if_stopped_here": accuracy(stopped),
            }
        )
        previous = rows
    return {
        "dataset": dataset,
        "seed": int(seed[1:]),
        "n": len(items),
        "zero_shot": {
            "plain": accuracy(plain),
            "calibrated": accuracy(calibrated),
            "auto_picks": "calibrated" if auto else "plain",
            "run_used_calibration": bool(step(run_dir / "zero-shot").get("calibrated")),
        },
        "round_0": accuracy([row["label"] for row in round0]),
        "rounds": rounds,
        "final": accuracy([row["label"] for row in read_jsonl(run_dir / "final" / "answers.jsonl")]),
        "slm_weight": weight,
    }


def table(runs: list[dict]) -> str:
    """Per data set, the mean and spread over the slices of each replayed choice: three tables."""

    def cell(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    names = sorted({r["dataset"] for r in runs})
    by = {name: [r for r in runs if r["dataset"] == name] for name in names}
    variants = list(runs[0]["rounds"][0]["llm_if_round_1_were"]) if runs and runs[0]["rounds"] else []
    out = [
        "| data | slices | zero-shot plain | calibrated | `auto` (picks) |",
        "|---|---|---|---|---|",
    ]
    for name, sel in by.items():
        picks = "/".join(r["zero_shot"]["auto_picks"] for r in sel)
        out.append(
            f"| {name} | {len(sel)} | {cell([r['zero_shot']['plain'] for r in sel])} "
            f"| {cell([r['zero_shot']['calibrated'] for r in sel])} "
            f"| {cell([r['zero_shot'][r['zero_shot']['auto_picks']] for r in sel])} ({picks}) |"
        )
    out += ["", "| data | round 0 | " + " | ".join(f"round 1: {v}" for v in variants) + " |"]
    out.append("|---|---|" + "---|" * len(variants))
    for name, sel in by.items():
        ones = [r["rounds"][0]["llm_if_round_1_were"] for r in sel]
        cells = " | ".join(cell([o[v] for o in ones]) for v in variants)
        out.append(f"| {name} | {cell([r['round_0'] for r in sel])} | {cells} |")
    out += [
        "",
        "| data | final, stopped after round 1 | final, after round 2 (the run) "
        "| changed share, round 1 (least–most) | round 2 |",
        "|---|---|---|---|---|",
    ]
    for name, sel in by.items():
        shares = [
            f"{min(x['changed_share'] for x in rd):.3f}–{max(x['changed_share'] for x in rd):.3f}"
            for rd in zip(*(r["rounds"] for r in sel), strict=False)
        ]
        out.append(
            f"| {name} | {cell([r['rounds'][0]['final_if_stopped_here'] for r in sel])} "
            f"| {cell([r['final'] for r in sel])} | {' | '.join(shares)} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="a bench/quality.py --keep folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    finished = [
        f for f in sorted(args.runs.glob(f"{args.preset}_*_s*")) if (f / "final/answers.jsonl").is_file()
    ]
    runs = [replay(f) for f in finished if load_task(DATA / f.name.split("_")[-3]).kind != "ner"]
    args.out.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()

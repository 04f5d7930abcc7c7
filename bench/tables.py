"""Render the committed benchmark results (bench/results/*.json) as the markdown tables of BENCHMARKS.md.

python bench/tables.py > /tmp/tables.md
"""

from __future__ import annotations

import json
from pathlib import Path

from freeal.annotate import label_entropy
from freeal.report import score

RESULTS = Path(__file__).resolve().parent / "results"


def zeroshot() -> None:
    data = json.loads((RESULTS / "zeroshot.json").read_text())
    print(f"Machine: {data['machine']}, threads {data['threads']}.\n")
    print(
        "| model | data | items | accuracy plain / calibrated | macro-F1 plain / calibrated "
        "| `auto` picks (accuracy) | s per item | prompt tokens per item (evaluated) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        entropy = {
            name: label_entropy(
                [label for label, n in r[name]["predicted_distribution"].items() for _ in range(n)]
            )
            for name in ("plain", "calibrated")
        }
        auto = "calibrated" if entropy["calibrated"] > entropy["plain"] else "plain"
        print(
            f"| {r['model']} | {r['dataset']} | {r['items']} ({r['slice']}) "
            f"| {r['plain']['accuracy']:.3f} / {r['calibrated']['accuracy']:.3f} "
            f"| {r['plain']['macro_f1']:.3f} / {r['calibrated']['macro_f1']:.3f} "
            f"| {auto} ({r[auto]['accuracy']:.3f}) "
            f"| {r['seconds_per_item']:.3f} "
            f"| {r['prompt_tokens_per_item']:.0f} ({r['evaluated_tokens_per_item']:.0f}) |"
        )


def slm(name: str) -> None:
    data = json.loads((RESULTS / name).read_text())
    print(
        f"\n`{name}`: {data['dataset']}, {data['items']} items, labels: {data['labels']} "
        f"({data['label_accuracy']:.4f} right where given, {data['abstained']} abstained); "
        f"device {data['device']}; GMM split {data.get('split', 'global')}; "
        f"backbone {data.get('backbone', 'all-minilm-l6-v2')}.\n"
    )
    print(
        "| mode | trained on | views | epochs | transductive | inductive (test) "
        "| GMM clean: share @ precision | clean set 20% / 25% / 30%: items @ precision (ranked by) "
        "| s per epoch: whole fit / training alone | peak memory MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in data["runs"]:
        gmm = r.get("gmm_clean")
        gmm_s = f"{gmm['share']:.3f} @ {gmm['precision']:.4f}" if gmm else "–"
        fb = r.get("feedback_clean")
        ranking = "mean loss" if "feedback_clean_final" in r else "final loss"
        fb_s = (
            " / ".join(f"{v['size']} @ {v['precision']:.4f}" for v in fb.values()) + f" ({ranking})"
            if fb
            else "–"
        )
        memory = r["peak_cuda_mb"] if r.get("peak_cuda_mb") else r["peak_rss_mb"]
        seconds = [e["seconds"] for e in r["epoch_log"] if "seconds" in e]
        train_s = f"{sum(seconds) / len(seconds):.1f}" if seconds else "–"
        names = {"robust": "noisy, robust", "plain": "noisy, plain CE", "gold": "gold, plain CE"}
        trained_on = names[r["variant"]] + "".join(f", {o}" for o in r.get("overrides", []))
        print(
            f"| {r['mode']} | {trained_on} | {r['views']} | {r['epochs']} "
            f"| {r['transductive_accuracy']:.4f} | {r['inductive_accuracy']:.4f} | {gmm_s} | {fb_s} "
            f"| {r['seconds_per_epoch']:.1f} / {train_s} | {memory:.0f} |"
        )


def loop(name: str) -> None:
    """One loop benchmark: a row per stage, from the run's report (freeal.report.rows)."""
    from freeal.report import HEADER, rows

    data = json.loads((RESULTS / name).read_text())
    report = data["report"]
    totals = report["totals"]
    print(
        f"\n`{name}`: {data['dataset']}, {data['slice']}; {data['machine']}; "
        f"total {totals['seconds'] / 60:.1f} min, "
        f"{totals['llm_calls']} LLM calls, {totals['evaluated_tokens']} tokens evaluated "
        f"of {totals['prompt_tokens']} sent." + (f" {data['note']}." if data.get("note") else "") + "\n"
    )
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows(report):
        print("| " + " | ".join(row) + " |")
    if "per_type" in ((report["rounds"][0]["llm"].get("metrics")) or {}):
        ner_types(report)


def _prf(m: dict | None, kind: str | None = None) -> str:
    if not m or not m.get("n"):
        return "–"
    if kind is None:
        return f"{m['precision']:.3f} / {m['recall']:.3f} / **{m['f1']:.3f}**"
    t = m["per_type"].get(kind)
    return f"{t['precision']:.3f} / {t['recall']:.3f} / {t['f1-score']:.3f}" if t else "–"


def ner_types(report: dict) -> None:
    """NER: entity-level precision / recall / F1 per stage, overall and per type."""
    first = report["rounds"][0]["llm"]["metrics"]
    kinds = sorted(first["per_type"])
    print()
    per_type = " | ".join(f"{k} P / R / F1" for k in kinds)
    print(f"| stage | labels P / R / F1 | {per_type} | SLM test F1 |")
    print("|" + "---|" * (len(kinds) + 3))
    stages = [("zero-shot", report.get("zero_shot"), None)] if report.get("zero_shot") else []
    stages += [
        ("initial round" if rd["round"] == 0 else f"refinery {rd['round']}", rd["llm"], rd["slm"])
        for rd in report["rounds"]
    ]
    for name, llm, slm_step in stages:
        m = llm.get("metrics")
        test = ((slm_step or {}).get("inductive") or {}).get("f1")
        print(
            f"| {name} | {_prf(m)} | "
            + " | ".join(_prf(m, k) for k in kinds)
            + f" | {'–' if test is None else f'{test:.3f}'} |"
        )


def tagger(name: str) -> None:
    """One tagger benchmark (bench/tagger.py): the same LLM labels, trained several ways."""
    data = json.loads((RESULTS / name).read_text())
    print(f"\n`{name}`: {data['dataset']}, {data['labels']}; test: {data['test']}; {data['settings']}.\n")
    print(
        "| trained on | test P / R / F1 | train-sentence F1 | clean sentences: share @ exact-right "
        "(noisy side) | s per epoch | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|")
    for r in data["rows"]:
        clean = (
            f"{r['clean_share']:.3f} @ {r['clean_precision']:.3f} ({r['noisy_precision']:.3f})"
            if "clean_share" in r
            else "–"
        )
        print(
            f"| {r['variant']} | {_prf(r['inductive'])} | {r['transductive']['f1']:.3f} | {clean} "
            f"| {r['seconds_per_epoch']:.1f} | {r['peak_rss_mb']:.0f} |"
        )


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def quality(preset: str = "default") -> None:
    """Issue 12's table: per data set, each slice's zero-shot, LLM labels per round, final labels,
    SLM test accuracy, calibration of the final confidence, LLM calls and time; then mean ± spread."""
    import statistics

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"quality_{preset}_*_s*.json"))]
    if not runs:
        return
    print(
        "| data | seed | zero-shot | LLM labels per round | final | gain | SLM test | ECE | top-50% acc. "
        "| LLM calls | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        mine = sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: r["seed"])
        for r in mine:
            cal = (r["report"]["final"] or {}).get("calibration") or {}
            totals = r["report"]["totals"]
            print(
                f"| {dataset} | {r['seed']} | {r['zero_shot']:.3f} "
                f"| {' → '.join(f'{x:.3f}' for x in r['llm_labels'])} | {r['final']:.3f} "
                f"| {100 * (r['final'] - r['zero_shot']):+.1f} | {r['slm_test']:.3f} "
                f"| {_num(cal.get('ece'))} | {_num(cal.get('top50_accuracy'))} "
                f"| {totals['llm_calls']} | {totals['seconds']:.0f} |"
            )
        gains = [100 * (r["final"] - r["zero_shot"]) for r in mine]
        spread = f" ± {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
        print(
            f"| **{dataset} mean** | {len(mine)} slices "
            f"| {statistics.mean(r['zero_shot'] for r in mine):.3f} | "
            f"| {statistics.mean(r['final'] for r in mine):.3f} "
            f"| **{statistics.mean(gains):+.1f}{spread}** (min {min(gains):+.1f}) "
            f"| {statistics.mean(r['slm_test'] for r in mine):.3f} | | | | |"
        )


def kappa_floor() -> None:
    """A classifier's ``min_kappa`` 0.6 on small TREC slices: each slice run under the old floor
    (``presets_<n>/``) and again under the new one (``min_kappa_floor/``), with the feedback
    step's SLM-LLM kappa, which decides."""
    import statistics

    after = sorted(
        (json.loads(p.read_text()) for p in (RESULTS / "min_kappa_floor").glob("quality_default_*_s*.json")),
        key=lambda r: (r["report"]["items"], r["seed"]),
    )
    if not after:
        return
    print(
        "| texts | seed | zero-shot | kappa | LLM labels per round, floor 0.2 | final, 0.2 | gain "
        "| refinery asked | final, 0.6 | gain | SLM test, 0.2 → 0.6 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    gains: dict[str, list[float]] = {"0.2": [], "0.6": []}
    for new in after:
        n, seed = new["report"]["items"], new["seed"]
        name = f"quality_default_{new['dataset']}_{n}_s{seed}.json"
        old = json.loads((RESULTS / f"presets_{n}" / name).read_text())
        kappa = old["report"]["rounds"][0]["feedback"]["kappa"]
        asked = sum(rd["llm"]["asked"] for rd in old["report"]["rounds"][1:])
        gain_old, gain_new = (100 * (r["final"] - r["zero_shot"]) for r in (old, new))
        gains["0.2"].append(gain_old)
        gains["0.6"].append(gain_new)
        print(
            f"| {n} | {seed} | {old['zero_shot']:.3f} | {kappa:.2f} "
            f"| {' → '.join(f'{x:.3f}' for x in old['llm_labels'])} | {old['final']:.3f} | {gain_old:+.1f} "
            f"| {asked} | {new['final']:.3f} | {gain_new:+.1f} "
            f"| {old['slm_test']:.3f} → {new['slm_test']:.3f} |"
        )
    print(
        f"| **mean** | {len(after)} slices | | | | | **{statistics.mean(gains['0.2']):+.1f} "
        f"± {statistics.stdev(gains['0.2']):.1f}** | | | **{statistics.mean(gains['0.6']):+.1f}** | |"
    )


def deployed_slm(preset: str = "default") -> None:
    """The SLM a run hands back, per quality run that trained it on the final labels
    (``deployed_slm: final_labels``): test score of the last round's SLM and of the retrained one,
    each one's gap to the final labels, and the extra step's seconds; then the mean ± spread."""
    import statistics

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"quality_{preset}_*_s*.json"))]
    runs = [r for r in runs if r["report"].get("deployed_slm")]
    print("| data | seed | final labels | last round's SLM, test | on the final labels, test | change | s |")
    print("|---|---|---|---|---|---|---|")
    for dataset in dict.fromkeys(r["dataset"] for r in runs):
        mine = sorted((r for r in runs if r["dataset"] == dataset), key=lambda r: r["seed"])
        rows = []
        for r in mine:
            report = r["report"]
            last = score(report["rounds"][report["final"]["round"]]["slm"]["inductive"])
            now = score(report["deployed_slm"]["inductive"])
            rows.append((r["final"], last, now))
            print(
                f"| {dataset} | {r['seed']} | {r['final']:.3f} | {last:.3f} | {now:.3f} "
                f"| {100 * (now - last):+.1f} | {report['deployed_slm']['seconds']:.0f} |"
            )
        change = [100 * (now - last) for _, last, now in rows]
        spread = f" ± {statistics.stdev(change):.1f}" if len(change) > 1 else ""
        gap = [100 * (now - final) for final, _, now in rows]
        print(
            f"| **{dataset} mean** | {len(rows)} slices | {statistics.mean(f for f, _, _ in rows):.3f} "
            f"| {statistics.mean(x for _, x, _ in rows):.3f} | {statistics.mean(x for _, _, x in rows):.3f} "
            f"| **{statistics.mean(change):+.1f}{spread}** (to the labels {statistics.mean(gap):+.1f}) | |"
        )


def frozen_slm() -> None:
    """The SLM on frozen vectors trained on each run's final labels (``bench/deployed_slm.py
    --set ... --gold``, files ``frozen_slm_*.json``): mean test score per data set, its gap to the
    final labels, and the same model trained on gold (the features' ceiling)."""
    import statistics

    print("| SLM (frozen mpnet) | data | final labels | SLM test | gap (points) | trained on gold |")
    print("|---|---|---|---|---|---|")
    for path in sorted(RESULTS.glob("frozen_slm_*.json")):
        for dataset, result in json.loads(path.read_text()).items():
            rows = result["slices"]
            gap = [100 * (r["final_labels_slm_test"] - r["final_labels"]) for r in rows]
            spread = f" ± {statistics.stdev(gap):.1f}" if len(gap) > 1 else ""
            gold = [r["gold_labels_slm_test"] for r in rows if "gold_labels_slm_test" in r]
            print(
                f"| {path.stem.removeprefix('frozen_slm_')} | {dataset} "
                f"| {statistics.mean(r['final_labels'] for r in rows):.3f} "
                f"| {statistics.mean(r['final_labels_slm_test'] for r in rows):.3f} "
                f"| {statistics.mean(gap):+.1f}{spread} ({', '.join(f'{g:+.1f}' for g in gap)}) "
                f"| {f'{statistics.mean(gold):.3f}' if gold else '–'} |"
            )


def slm_on_final_labels() -> None:
    """Issue 12's SLM target: the SLM a user trains on freeal's final labels (``bench/slm.py
    --labels file --labels-file RUN/labels.jsonl``), its test accuracy against those labels' own
    accuracy, per slice; writes ``final_slm_summary.json``."""
    import statistics

    runs = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("slmfinal_*.json"))]
    if not runs:
        return
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        run = r["runs"][0]
        precision = "bf16" if "mixed_precision=bf16" in run["overrides"] else "fp32"
        key = (r["dataset"], run["mode"], run["epochs"], precision, r["device"])
        groups.setdefault(key, []).append(r)
    print(
        "| data | SLM | device | epochs | precision | slices | final labels | SLM test | gap (points) "
        "| s per epoch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary: dict = {}
    for (dataset, mode, epochs, precision, device), mine in groups.items():
        labels = [r["label_accuracy"] for r in mine]
        test = [r["runs"][0]["inductive_accuracy"] for r in mine]
        gaps = [100 * (t - f) for t, f in zip(test, labels, strict=True)]
        seconds = [r["runs"][0]["seconds_per_epoch"] for r in mine]
        spread = f" ± {statistics.stdev(gaps):.1f}" if len(gaps) > 1 else ""
        print(
            f"| {dataset} | {mode} | {device} | {epochs} | {precision} | {len(mine)} "
            f"| {statistics.mean(labels):.3f} "
            f"| {statistics.mean(test):.3f} | {statistics.mean(gaps):+.1f}{spread} "
            f"({', '.join(f'{g:+.1f}' for g in gaps)}) | {statistics.mean(seconds):.1f} |"
        )
        summary.setdefault(dataset, []).append(
            {
                "mode": mode,
                "epochs": epochs,
                "precision": precision,
                "device": device,
                "final_labels": labels,
                "slm_test": test,
                "gap_points": gaps,
                "seconds_per_epoch": seconds,
            }
        )
    (RESULTS / "final_slm_summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def scale_loop() -> None:
    """The whole loop at growing N (``bench/scale_loop.py``): seconds per stage, per text per
    round, and run memory, with the growth exponent between the last two sizes."""
    import math

    runs = json.loads((RESULTS / "scale_loop.json").read_text())["runs"]
    a, b = runs[-2], runs[-1]

    def growth(x: float, y: float) -> str:
        return f"{math.log(y / x) / math.log(b['n'] / a['n']):.2f}"

    sizes = " | ".join(f"{r['n']:,} texts" for r in runs)
    print(f"| stage | {sizes} | growth exponent ({a['n']:,} → {b['n']:,}) |")
    print("|---|" + "---|" * (len(runs) + 1))
    names = {"llm": "LLM calls (client and loopback server)", "slm": "SLM (6 head fits per round)"}
    for stage in ("llm", "slm", "feedback", "final"):
        cells = [
            f"{r['stages'][stage]['seconds']:.1f} s ({r['stages'][stage]['peak_mb']:,.0f} MB)" for r in runs
        ]
        x, y = a["stages"][stage]["seconds"], b["stages"][stage]["seconds"]
        print(f"| {names.get(stage, stage)} | " + " | ".join(cells) + f" | {growth(x, y)} |")
    rows = {
        "**whole loop**": lambda r: r["loop_seconds"],
        "ms per text per round": lambda r: r["ms_per_text_per_round"],
        "the same, loopback server's CPU taken out": lambda r: (
            1000 * (r["loop_seconds"] - r["server_cpu_seconds"]) / r["n"] / r["rounds"]
        ),
        "the same, LLM stage taken out": lambda r: r["ms_per_text_per_round_without_llm_stage"],
        "run memory, MB (peak − base)": lambda r: r["peak_mb"] - r["base_mb"],
    }
    for name, value in rows.items():
        cells = " | ".join(f"{value(r):,.2f}" for r in runs)
        per_text = name.startswith(("ms", "the same"))  # a rate: its growth says nothing of N
        print(f"| {name} | {cells} | {'–' if per_text else growth(value(a), value(b))} |")


if __name__ == "__main__":
    scale_loop()
    quality()
    kappa_floor()
    deployed_slm()
    frozen_slm()
    slm_on_final_labels()
    quality("paper")
    zeroshot()
    for path in sorted(RESULTS.glob("slm_*.json")):
        if "dataset" in json.loads(path.read_text()):  # bench/slm.py's (not slm_folds.py's)
            slm(path.name)
    for path in sorted(RESULTS.glob("loop_*.json")):
        loop(path.name)
    for path in sorted(RESULTS.glob("tagger_*.json")):
        tagger(path.name)

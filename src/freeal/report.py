"""How the labels were reached: per-round numbers from a run folder, as a table and an HTML page.

Everything is read back from the run folder (the steps' ``step.json`` and per-item JSONL files,
``items.jsonl``), so a report can be made for any run folder, finished or not, without running
anything. Gold labels only add scores (accuracy plots, confusion matrices); without them the page
still shows what a user can judge the labels by: how they moved per round, how often the SLM
trained on them agrees, how confident both models are, and the texts to check first. The HTML
page is self-contained (plots are embedded PNGs, no scripts, no network), so it can be mailed or
opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.table import Table

BINS = 20  # confidence histograms: equal-width bins over [0, 1]
EXAMPLES = 10  # texts per "check first" table


#: what made the final labels, by ``final/step.json``'s ``rule``
FINAL_RULES = {"combined": "LLM + SLM", "structure": "texts' clusters"}


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _columns(path: Path, *keys: str) -> dict[str, list[Any]]:
    """Some fields of every row of a JSONL file (missing fields: None), not the rows: a report of a
    million texts keeps a label and a number per text and round. Equal label strings share one object."""
    from freeal.data import iter_jsonl

    out: dict[str, list[Any]] = {k: [] for k in keys}
    if not path.is_file():
        return out
    shared: dict[str, str] = {}
    for row in iter_jsonl(path):
        for k in keys:
            value = row.get(k)
            out[k].append(shared.setdefault(value, value) if isinstance(value, str) else value)
    return out


def _histogram(values: list[float | None]) -> list[int] | None:
    """Counts per confidence bin (kept instead of the values, so report.json stays small)."""
    import numpy as np

    known = [v for v in values if v is not None]
    return np.histogram(known, bins=BINS, range=(0, 1))[0].tolist() if known else None


def _show(answer: Any, tokens: list[str] | None) -> str:
    """An answer as a reader wants it: a label, or a sentence's entities as ``type: words``, one a
    line."""
    if answer is None:
        return "(no answer)"
    if isinstance(answer, str):
        return answer
    return "\n".join(f"{k}: {' '.join((tokens or [])[a:b])}" for k, a, b in answer) or "(no entities)"


def _stage(r: int) -> str:
    return "initial round" if r == 0 else f"refinery {r}"


def collect(run_dir: str | Path) -> dict:
    """Per-round numbers of a run folder: the demonstrations step, each round's LLM, SLM and
    feedback steps with the LLM-SLM agreement and confidence histograms, the zero-shot baseline
    when it was run, the texts to check first, and totals."""
    from freeal.kinds import KINDS

    run_dir = Path(run_dir)
    spec = _read(run_dir / "run.json") or {}
    kind = KINDS.get(spec.get("task", {}).get("kind", "classification"), KINDS["classification"])
    key = kind.answer_key
    rounds: list[dict[str, Any]] = []
    answers: list[list[Any]] = []  # each round's answers, in items.jsonl's order
    llm_confidence: list[float | None] = []  # the last round's
    fit: dict[str, list[Any]] = {"predicted": [], "confidence": []}  # the last SLM's
    r = 0
    while (llm := _read(run_dir / f"round-{r}/llm/step.json")) is not None:
        given = _columns(run_dir / f"round-{r}/llm/labels.jsonl", key, "confidence")
        answers.append(given[key])
        llm_confidence = given["confidence"]
        fit = _columns(run_dir / f"round-{r}/slm/predictions.jsonl", "predicted", "confidence", "agree")
        rounds.append(
            {
                "round": r,
                "llm": llm,
                "slm": _read(run_dir / f"round-{r}/slm/step.json"),
                "feedback": _read(run_dir / f"round-{r}/feedback/step.json"),
                "agreement": sum(fit["agree"]) / len(fit["agree"]) if fit["agree"] else None,
                "confidence": {"LLM": _histogram(llm_confidence), "SLM": _histogram(fit["confidence"])},
            }
        )
        r += 1
    final = _columns(run_dir / "final/answers.jsonl", key, "confidence")
    deployed = _read(run_dir / "final/slm/step.json")
    steps: list[dict[str, Any]] = [
        s
        for s in (
            _read(run_dir / "zero-shot/step.json"),
            _read(run_dir / "demos/step.json"),
            *(x for rd in rounds for x in (rd["llm"], rd["slm"], rd["feedback"])),
            deployed,
        )
        if s
    ]
    usage = [s.get("llm_usage") or {} for s in steps]
    final_step = _read(run_dir / "final/step.json")
    return {
        "run_dir": str(run_dir),
        "task": spec.get("task", {}).get("name"),
        "unit": kind.unit,
        "items": spec.get("texts", {}).get("n"),
        "zero_shot": _read(run_dir / "zero-shot/step.json"),
        "demos": _read(run_dir / "demos/step.json"),
        "rounds": rounds,
        "final": final_step,
        # the loop's own words on why the rounds ended where they did (final/step.json)
        "notes": (final_step or {}).get("notes", []),
        # only an SLM trained on the final labels; a skipped step handed back the last round's
        "deployed_slm": deployed if deployed and "epochs" in deployed else None,
        "final_confidence": _histogram(final["confidence"]),
        "examples": _examples(
            run_dir / "items.jsonl",
            [_stage(r) for r in range(len(answers))] + (["final"] if final[key] else []),
            [*answers, final[key]] if final[key] else answers,
            fit["predicted"],
            [("final labels", final["confidence"]), ("SLM", fit["confidence"]), ("LLM", llm_confidence)],
        ),
        "totals": {
            "seconds": sum(s["seconds"] for s in steps),
            "llm_calls": sum(u.get("calls", 0) for u in usage),
            "llm_cache_hits": sum(u.get("cache_hits", 0) for u in usage),
            "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in usage),
            "evaluated_tokens": sum(u.get("evaluated_tokens", 0) for u in usage),
        },
    }


def _examples(
    items_path: Path,
    names: list[str],
    stages: list[list[Any]],
    slm: list[Any],
    confidences: list[tuple[str, list[Any]]],
) -> dict:
    """The texts to check first, with their answers stage by stage (``stages``: each round's, then
    the final ones when made): the least confident labels (``confidences``: the first source that
    has any, e.g. the final labels', else the last SLM's or LLM's) and those whose label changed
    most often. Every list is in ``items.jsonl``'s order; only the texts shown are read whole."""
    from freeal.data import iter_jsonl

    n = _count_rows(items_path)
    source, confidence = next(
        ((name, values) for name, values in confidences if any(v is not None for v in values)),
        (None, [None] * n),
    )
    known = [c if c is not None else float("nan") for c in confidence]
    usable = n > 0 and all(len(s) == n for s in stages) and len(confidence) == n
    changes = [sum(a[i] != b[i] for a, b in pairwise(stages)) for i in range(n)] if usable else []
    least = sorted((i for i in range(len(changes)) if confidence[i] is not None), key=lambda i: known[i])
    most = sorted((i for i, c in enumerate(changes) if c), key=lambda i: (-changes[i], confidence[i] or 1.0))
    shown = {*least[:EXAMPLES], *most[:EXAMPLES]}
    records: dict[int, dict] = {}
    for i, item in enumerate(iter_jsonl(items_path) if shown else ()):
        if i in shown:
            tokens = item.get("tokens")
            records[i] = {
                "id": item["id"],
                "text": item["text"] if "text" in item else " ".join(tokens or []),
                "labels": [_show(s[i], tokens) for s in stages],
                "changes": changes[i],
                "slm": _show(slm[i], tokens) if len(slm) == n else None,
                "confidence": confidence[i],
            }
    return {
        "stages": names,
        "confidence_of": source,
        "least_confident": [records[i] for i in least[:EXAMPLES]],
        "most_changed": [records[i] for i in most[:EXAMPLES]],
    }


def _count_rows(path: Path) -> int:
    """The items in a JSONL file, counted without parsing them: 0 if absent. A row is a line that is
    not blank as text, as :func:`freeal.data.iter_jsonl` reads them (bytes would count a line of
    non-ASCII spaces that it skips, and the counts would no longer match)."""
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8-sig", errors="replace") as fh:
        return sum(1 for line in fh if line.strip())


def score(metrics: dict | None) -> float | None:
    """The headline number of a metrics dict: accuracy (classification) or entity F1 (NER)."""
    if not metrics or not metrics.get("n"):
        return None
    return metrics.get("accuracy", metrics.get("f1"))


def has_gold(report: dict) -> bool:
    """Whether any stage was scored against gold labels (else the page shows no scores at all)."""
    steps = [report.get("zero_shot"), report.get("final"), *(rd["llm"] for rd in report["rounds"])]
    return any(score((s or {}).get("metrics")) is not None for s in steps)


def _acc(report: dict | None) -> str:
    value = score(report)
    return f"{value:.3f}" if value is not None else "–"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "–"


def _cost(step: dict) -> dict[str, str]:
    """What a step cost: LLM calls (cache hits are free and shown apart), tokens and seconds."""
    u = step.get("llm_usage") or {}
    hits = f" (+{u['cache_hits']} cached)" if u.get("cache_hits") else ""
    return {
        "LLM calls": f"{u.get('calls', 0)}{hits}",
        "tokens eval./prompt": f"{u.get('evaluated_tokens', 0)} / {u.get('prompt_tokens', 0)}",
        "LLM s": f"{step['seconds']:.0f}",
    }


# name, what it means, whether it needs gold labels
COLUMNS = [
    ("stage", "", False),
    ("asked", "texts the LLM labeled", False),
    ("changed", "labels the step changed", False),
    ("noisy", "share the SLM flagged noisy", False),
    ("LLM=SLM", "share of texts where the SLM, trained on the labels, predicts the LLM's label", False),
    ("LLM calls", "calls made (+ answers taken from the cache, free)", False),
    ("tokens eval./prompt", "prompt tokens the model evaluated / sent", False),
    ("LLM s", "seconds of LLM work", False),
    ("SLM s", "seconds of SLM training", False),
    ("labels acc./F1", "the labels against gold (accuracy; entity-level F1 for NER)", True),
    ("SLM train", "the same for the SLM's predictions on the labeled texts", True),
    ("SLM test", "the same on the test set", True),
    ("clean prec.", "share of clean-flagged labels that are right (NER: sentences all right)", True),
]  # fmt: skip
HEADER = [name for name, _, _ in COLUMNS]


def rows(report: dict) -> list[list[str]]:
    """The table's rows: one per stage (zero-shot baseline, demonstration writing, each round, the
    final labels), one cell per column of ``COLUMNS`` ('–' where a stage has no such number)."""
    stages = []
    zs = report.get("zero_shot")
    if zs:
        stages.append(
            {
                "stage": "zero-shot (baseline)",
                "asked": str(zs["asked"]),
                **_cost(zs),
                "labels acc./F1": _acc(zs.get("metrics")),
            }
        )
    demos = report.get("demos")
    if demos:
        kept = f"{demos['kept']} kept"
        if demos.get("verified") is not None:
            kept += f", {demos['verified']} labeled as intended"
        stages.append({"stage": "demonstrations", "asked": kept, **_cost(demos)})
    for rd in report["rounds"]:
        llm, slm = rd["llm"], rd["slm"] or {}
        stages.append(
            {
                "stage": _stage(rd["round"]),
                "asked": str(llm["asked"]),
                "changed": "–" if rd["round"] == 0 else _pct(llm["changed_share"]),
                "noisy": _pct(slm.get("noisy_share")),
                "LLM=SLM": _pct(rd.get("agreement")),
                **_cost(llm),
                **({"SLM s": f"{slm['seconds']:.0f}"} if slm else {}),
                "labels acc./F1": _acc(llm.get("metrics")),
                "SLM train": _acc(slm.get("transductive")),
                "SLM test": _acc(slm.get("inductive")),
                "clean prec.": _pct(slm.get("clean_precision")),
            }
        )
    final = report.get("final")
    if final:
        # the SLM trained once more on the final labels, when it was (deployed_slm: final_labels)
        slm = report.get("deployed_slm") or {}
        stages.append(
            {
                "stage": f"final ({FINAL_RULES.get(final['rule'], 'LLM')})",
                "changed": str(final["changed_from_llm"]),
                **({"SLM s": f"{slm['seconds']:.0f}"} if slm else {}),
                "labels acc./F1": _acc(final.get("metrics")),
                "SLM train": _acc(slm.get("transductive")),
                "SLM test": _acc(slm.get("inductive")),
                "clean prec.": _pct(slm.get("clean_precision")),
            }
        )
    return [[s.get(name, "–") for name in HEADER] for s in stages]


def columns(report: dict) -> tuple[list[str], list[list[str]], str]:
    """Header, rows and caption of the table, without the gold-only columns when there is no gold
    (a column of dashes says nothing, and would suggest a score that was never measured)."""
    gold = has_gold(report)
    keep = [i for i, (_, _, needs_gold) in enumerate(COLUMNS) if gold or not needs_gold]
    caption = "; ".join(f"{COLUMNS[i][0]}: {COLUMNS[i][1]}" for i in keep[1:])
    return [HEADER[i] for i in keep], [[row[i] for i in keep] for row in rows(report)], caption


def table(report: dict) -> Table:
    """The per-round table for the terminal (scores only when there are gold labels)."""
    header, body, caption = columns(report)
    t = Table(
        title=f"freeal run: {report['task']} ({report['items']} {report['unit']})",
        caption=caption,
    )
    for col in header:
        t.add_column(col, justify="left" if col == "stage" else "right")
    for row in body:
        t.add_row(*row)
    return t


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _round_axis(ax: Any, xs: list[int], ylabel: str, final: bool = False) -> None:
    """The x axis every per-round plot shares (with a 'final' tick after the rounds when plotted),
    and the legend under the plot, where it hides no data and leaves room for two plots a row."""
    ticks = [*xs, len(xs)] if final else xs
    ax.set_xticks(ticks, [str(x) for x in xs] + (["final"] if final else []))
    ax.set_xlabel("round (0 = initial)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    rounds = report["rounds"]
    xs = [rd["round"] for rd in rounds]
    plots = []

    def keep(title: str, fig: Any) -> None:
        plots.append((title, _png(fig)))
        plt.close(fig)

    if has_gold(report):
        ner = "f1" in (rounds[0]["llm"].get("metrics") or {}) if rounds else False
        fig, ax = plt.subplots(figsize=(5, 3))
        series = {
            "LLM labels": [score(rd["llm"].get("metrics")) for rd in rounds],
            "SLM on the train texts": [score((rd["slm"] or {}).get("transductive")) for rd in rounds],
            "SLM on the test set": [score((rd["slm"] or {}).get("inductive")) for rd in rounds],
        }
        for name, vals in series.items():
            pts = [(x, v) for x, v in zip(xs, vals, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        final = score((report.get("final") or {}).get("metrics"))
        if final is not None:
            ax.plot([len(xs)], [final], marker="*", markersize=14, linestyle="", label="final labels")
        deployed = score((report.get("deployed_slm") or {}).get("inductive"))
        if deployed is not None:
            label = "SLM on the final labels, test"
            ax.plot([len(xs)], [deployed], marker="P", markersize=10, linestyle="", label=label)
        zs = score((report.get("zero_shot") or {}).get("metrics"))
        if zs is not None:
            ax.axhline(zs, color="grey", linestyle="--", label="zero-shot labels")
        _round_axis(ax, xs, "entity F1" if ner else "accuracy", final is not None)
        keep(f"{'Entity F1' if ner else 'Accuracy'} per round (against gold)", fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    width = 0.38
    changed = [rd["llm"].get("changed_share", 0.0) if rd["round"] else 0.0 for rd in rounds]
    noisy = [(rd["slm"] or {}).get("noisy_share", 0.0) for rd in rounds]
    ax.bar([x - width / 2 for x in xs], changed, width, label="labels changed this round")
    ax.bar([x + width / 2 for x in xs], noisy, width, label="flagged noisy by the SLM")
    _round_axis(ax, xs, f"share of {report['unit']}")
    keep("Label changes and estimated noise per round", fig)
    agree = [
        (x, rd["agreement"]) for x, rd in zip(xs, rounds, strict=True) if rd.get("agreement") is not None
    ]
    kappa: list[tuple[int, float]] = [
        (x, rd["feedback"]["kappa"])
        for x, rd in zip(xs, rounds, strict=True)
        if (rd["feedback"] or {}).get("kappa") is not None
    ]
    if agree:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(*zip(*agree, strict=True), marker="o", label="SLM predicts the LLM's label")
        if kappa:
            ax.plot(*zip(*kappa, strict=True), marker="s", label="kappa (before each refinery)")
        ax.set_ylim(min([0.0, *(k for _, k in kappa)]), 1.02)
        _round_axis(ax, xs, "share / kappa")
        keep("LLM-SLM agreement per round", fig)
    panels = [
        (title, [(f"round {rd['round']}", rd["confidence"][who]) for rd in rounds if rd["confidence"][who]])
        for title, who in (("LLM answers", "LLM"), ("SLM predictions", "SLM"))
    ] + [("final labels", [("final", report["final_confidence"])] if report.get("final_confidence") else [])]
    panels = [(title, lines) for title, lines in panels if lines]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3), sharey=True, squeeze=False)
        for ax, (title, lines) in zip(axes[0], panels, strict=True):
            for name, counts in lines:
                ax.stairs(counts, np.linspace(0, 1, BINS + 1), label=name, linewidth=1.5)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("confidence")
            ax.set_yscale("log")  # the few low-confidence answers are what matters
            ax.legend(loc="upper left", fontsize=8)
        axes[0][0].set_ylabel(report["unit"])
        keep(f"Confidence (log scale) of the {', '.join(t for t, _ in panels)}", fig)
    shown = [(f"{_stage(rounds[0]['round'])}'s labels", rounds[0]["llm"])] if rounds else []
    shown += [("final labels", report["final"])] if report.get("final") else []
    for name, step in shown:
        metrics = step.get("metrics")
        if not metrics or not metrics.get("n") or "confusion" not in metrics:
            continue
        fig, ax = plt.subplots(figsize=(4, 3.5))
        ax.imshow(metrics["confusion"], cmap="Blues")
        names = metrics["labels"]
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(metrics["confusion"])), names[: len(metrics["confusion"])])
        top = max(max(row) for row in metrics["confusion"]) or 1
        for i, row in enumerate(metrics["confusion"]):
            for j, v in enumerate(row):
                shade = "white" if v > top / 2 else "black"  # readable on dark and light cells
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color=shade)
        ax.set_xlabel("label given")
        ax.set_ylabel("gold")
        keep(f"Confusion matrix of the {name}", fig)
    return plots


def type_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """NER only: entity precision / recall / F1 per type for each stage's labels (empty otherwise)."""
    stages = [("zero-shot (baseline)", report.get("zero_shot"))] if report.get("zero_shot") else []
    stages += [(_stage(rd["round"]), rd["llm"]) for rd in report["rounds"]]
    stages += [("final", report["final"])] if report.get("final") else []
    metrics = [(name, step.get("metrics")) for name, step in stages if step]
    kinds = sorted({k for _, m in metrics if m and "per_type" in m for k in m["per_type"]})
    if not kinds:
        return [], []
    header = ["stage", "all: P / R / F1", *(f"{k}: P / R / F1" for k in kinds)]
    out = []
    for name, m in metrics:
        if not m or not m.get("n"):
            continue
        cells = [f"{m['precision']:.3f} / {m['recall']:.3f} / {m['f1']:.3f}"]
        for k in kinds:
            t = m["per_type"].get(k)
            cells.append(f"{t['precision']:.3f} / {t['recall']:.3f} / {t['f1-score']:.3f}" if t else "–")
        out.append([name, *cells])
    return header, out


def _html_table(header: list[str], body: list[list[str]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>'


def _check_first(report: dict) -> str:
    """The 'texts to check first' tables: each text with its label stage by stage, a label shown
    only where it changed ('=' where it did not, so changes stand out), and the SLM's prediction."""
    ex = report.get("examples") or {}
    header = ["text", *ex.get("stages", []), "SLM (last round)", "confidence"]
    out = []
    for title, picked in (
        ("Least confident", ex.get("least_confident")),
        ("Changed most often", ex.get("most_changed")),
    ):
        if picked:
            body = [
                [
                    x["text"],
                    *(
                        now if i == 0 or now != x["labels"][i - 1] else "="
                        for i, now in enumerate(x["labels"])
                    ),
                    x["slm"] or "–",
                    f"{x['confidence']:.2f}" if x["confidence"] is not None else "–",
                ]
                for x in picked
            ]
            out.append(f"<h3>{html.escape(title)}</h3>{_html_table(header, body, 'texts')}")
    note = f"Labels stage by stage ('=': unchanged); confidence of the {ex.get('confidence_of')}."
    return (
        f"<h2>Texts to check first</h2><p><small>{html.escape(note)}</small></p>{''.join(out)}" if out else ""
    )


def write_html(report: dict, path: str | Path) -> Path:
    """A self-contained HTML page: the per-stage table (labels, agreement, cost), totals, per-round
    plots and the texts to check first."""
    from freeal.data import write_text_atomic

    header, body, caption = columns(report)
    totals = report["totals"]
    kinds_head, kinds_rows = type_rows(report)
    per_type = (
        f"<h2>Entities per type (labels against gold)</h2>{_html_table(kinds_head, kinds_rows)}"
        if kinds_rows
        else ""
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(t)}'
        "</figcaption></figure>"
        for t, b64 in _plots(report)
    )
    gold = (
        "Gold labels were used only to score this page; the LLM and the SLM never saw them."
        if has_gold(report)
        else "No gold labels: nothing here is scored against the truth. What the labels can be judged by: "
        "how much each round changed them, how often the SLM trained on them predicts them back, how "
        "confident both models are, and the texts below to check first."
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>freeal run: {html.escape(str(report["task"]))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1250px}}
table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap;font-size:.92em}}
td:first-child,th:first-child{{text-align:left}}
table.texts td,table.texts th{{text-align:left;vertical-align:top;white-space:pre-line}}
table.texts td:first-child{{min-width:22em;max-width:36em}}
figure{{display:inline-block;margin:1em;vertical-align:top}}small{{color:#555}}</style></head><body>
<h1>freeal run: {html.escape(str(report["task"]))}</h1>
<p>{report["items"]} {report["unit"]}; run folder <code>{html.escape(report["run_dir"])}</code>.
Total {totals["seconds"]:.0f} s, {totals["llm_calls"]} LLM calls
({totals["llm_cache_hits"]} answers from the cache),
{totals["evaluated_tokens"]} prompt tokens evaluated of {totals["prompt_tokens"]}.</p>
<p>{gold}</p>
<h2>Stages: labels, agreement and cost</h2>
{_html_table(header, body)}
<p><small>{html.escape(caption)}</small></p>
{"".join(f"<p>{html.escape(note)}</p>" for note in report.get("notes", []))}
{per_type}
<h2>Round by round</h2>
{figures}
{_check_first(report)}
</body></html>
"""
    return write_text_atomic(path, page)

"""How the labels were reached: per-round numbers from a run folder, as a table and an HTML page.

Everything is read back from the steps' ``step.json`` files, so a report can be made for any run
folder, finished or not, without running anything. The HTML page is self-contained (plots are
embedded PNGs, no scripts, no network), so it can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(run_dir: str | Path) -> dict:
    """Per-round numbers of a run folder: the demonstrations step, each round's LLM, SLM and
    feedback steps, the zero-shot baseline when it was run, and totals."""
    run_dir = Path(run_dir)
    rounds = []
    r = 0
    while (llm := _read(run_dir / f"round-{r}/llm/step.json")) is not None:
        rounds.append(
            {
                "round": r,
                "llm": llm,
                "slm": _read(run_dir / f"round-{r}/slm/step.json"),
                "feedback": _read(run_dir / f"round-{r}/feedback/step.json"),
            }
        )
        r += 1
    steps = [
        s
        for s in (
            _read(run_dir / "zero-shot/step.json"),
            _read(run_dir / "demos/step.json"),
            *(x for rd in rounds for x in (rd["llm"], rd["slm"], rd["feedback"])),
        )
        if s
    ]
    usage = [s.get("llm_usage") or {} for s in steps]
    spec = _read(run_dir / "run.json") or {}
    return {
        "run_dir": str(run_dir),
        "task": spec.get("task", {}).get("name"),
        "items": spec.get("texts", {}).get("n"),
        "zero_shot": _read(run_dir / "zero-shot/step.json"),
        "demos": _read(run_dir / "demos/step.json"),
        "rounds": rounds,
        "final": _read(run_dir / "final/step.json"),
        "totals": {
            "seconds": sum(s["seconds"] for s in steps),
            "llm_calls": sum(u.get("calls", 0) for u in usage),
            "llm_cache_hits": sum(u.get("cache_hits", 0) for u in usage),
            "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in usage),
            "evaluated_tokens": sum(u.get("evaluated_tokens", 0) for u in usage),
        },
    }


def score(metrics: dict | None) -> float | None:
    """The headline number of a metrics dict: accuracy (classification) or entity F1 (NER)."""
    if not metrics or not metrics.get("n"):
        return None
    return metrics.get("accuracy", metrics.get("f1"))


def _acc(report: dict | None) -> str:
    value = score(report)
    return f"{value:.3f}" if value is not None else "–"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "–"


def rows(report: dict) -> list[list[str]]:
    """The table's rows: one per stage (zero-shot baseline, demonstration writing, each round)."""
    out = []
    zs = report.get("zero_shot")
    if zs:
        u = zs.get("llm_usage", {})
        out.append(
            [
                "zero-shot (baseline)",
                str(zs["asked"]),
                "–",
                "–",
                str(u.get("calls", 0)),
                f"{u.get('evaluated_tokens', 0)} / {u.get('prompt_tokens', 0)}",
                f"{zs['seconds']:.0f}",
                "–",
                _acc(zs.get("metrics")),
                "–",
                "–",
                "–",
            ]
        )
    demos = report.get("demos")
    if demos:
        u = demos.get("llm_usage", {})
        out.append(
            [
                "demonstrations",
                f"{demos['verified']} of {demos['kept']} kept"
                if "verified" in demos
                else f"{demos['kept']} kept",
                "–",
                "–",
                str(u.get("calls", 0)),
                f"{u.get('evaluated_tokens', 0)} / {u.get('prompt_tokens', 0)}",
                f"{demos['seconds']:.0f}",
                "–",
                "–",
                "–",
                "–",
                "–",
            ]
        )
    for rd in report["rounds"]:
        llm, slm = rd["llm"], rd["slm"] or {}
        u = llm.get("llm_usage", {})
        name = "initial round" if rd["round"] == 0 else f"refinery {rd['round']}"
        out.append(
            [
                name,
                str(llm["asked"]),
                "–" if rd["round"] == 0 else _pct(llm["changed_share"]),
                _pct(slm.get("noisy_share")),
                str(u.get("calls", 0)),
                f"{u.get('evaluated_tokens', 0)} / {u.get('prompt_tokens', 0)}",
                f"{llm['seconds']:.0f}",
                f"{slm['seconds']:.0f}" if slm else "–",
                _acc(llm.get("metrics")),
                _acc(slm.get("transductive")),
                _acc(slm.get("inductive")),
                _pct(slm.get("clean_precision")),
            ]
        )
    final = report.get("final")
    if final:
        out.append(
            [
                f"final ({'LLM + SLM' if final['rule'] == 'combined' else 'LLM'})",
                "–",
                str(final["changed_from_llm"]),
                *["–"] * 5,
                _acc(final.get("metrics")),
                *["–"] * 3,
            ]
        )
    return out


HEADER = [
    "stage", "asked", "changed", "noisy", "LLM calls", "tokens eval./prompt",
    "LLM s", "SLM s", "labels acc./F1", "SLM train", "SLM test", "clean prec.",
]  # fmt: skip
CAPTION = (
    "asked: texts the LLM labeled; changed: labels changed by the round; noisy: share the SLM flagged "
    "noisy; tokens: prompt tokens the model evaluated / sent; labels acc./F1: the labels against gold "
    "(accuracy; entity-level F1 for NER); SLM train / test: the same for the SLM's predictions on the "
    "labeled texts / the test set; clean prec.: share of clean-flagged labels that are right (NER: "
    "sentences whose tags are all right)"
)


def table(report: dict) -> Table:
    """The per-round table for the terminal (accuracy columns show '–' without gold labels)."""
    t = Table(title=f"freeal run: {report['task']} ({report['items']} texts)", caption=CAPTION)
    for col in HEADER:
        t.add_column(col, justify="left" if col == "stage" else "right")
    for row in rows(report):
        t.add_row(*row)
    return t


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rounds = report["rounds"]
    xs = [rd["round"] for rd in rounds]
    plots = []
    series = {
        "LLM labels": [score(rd["llm"].get("metrics")) for rd in rounds],
        "SLM on the train texts": [score((rd["slm"] or {}).get("transductive")) for rd in rounds],
        "SLM on the test set": [score((rd["slm"] or {}).get("inductive")) for rd in rounds],
    }
    if any(v is not None for vals in series.values() for v in vals):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, vals in series.items():
            pts = [(x, v) for x, v in zip(xs, vals, strict=True) if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        zs = (report.get("zero_shot") or {}).get("metrics")
        if score(zs) is not None:
            ax.axhline(score(zs), color="grey", linestyle="--", label="zero-shot labels")
        ax.set_xlabel("round (0 = initial)")
        ax.set_ylabel("entity F1" if "f1" in (rounds[0]["llm"].get("metrics") or {}) else "accuracy")
        ax.set_xticks(xs)
        ax.legend()
        plots.append(("Accuracy per round", _png(fig)))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    changed = [rd["llm"].get("changed_share", 0.0) if rd["round"] else 0.0 for rd in rounds]
    noisy = [(rd["slm"] or {}).get("noisy_share", 0.0) for rd in rounds]
    ax.bar([x - width / 2 for x in xs], changed, width, label="labels changed this round")
    ax.bar([x + width / 2 for x in xs], noisy, width, label="flagged noisy by the SLM")
    ax.set_xlabel("round (0 = initial)")
    ax.set_ylabel("share of texts")
    ax.set_xticks(xs)
    ax.legend()
    plots.append(("Label changes and estimated noise per round", _png(fig)))
    plt.close(fig)
    for rd in rounds:
        metrics = rd["llm"].get("metrics")
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
        plots.append((f"Confusion matrix of the labels after round {rd['round']}", _png(fig)))
        plt.close(fig)
    return plots


def type_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """NER only: entity precision / recall / F1 per type for each stage's labels (empty otherwise)."""
    stages = [("zero-shot (baseline)", report.get("zero_shot"))] if report.get("zero_shot") else []
    stages += [
        ("initial round" if rd["round"] == 0 else f"refinery {rd['round']}", rd["llm"])
        for rd in report["rounds"]
    ]
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


def write_html(report: dict, path: str | Path) -> Path:
    """A self-contained HTML page: the per-round table, totals, and plots."""
    from freeal.data import write_text_atomic

    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADER)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows(report)
    )
    totals = report["totals"]
    kinds_head, kinds_rows = type_rows(report)
    per_type = (
        "<h2>Entities per type (labels against gold)</h2><table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in kinds_head)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in kinds_rows)
        + "</tbody></table>"
        if kinds_rows
        else ""
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(t)}'
        "</figcaption></figure>"
        for t, b64 in _plots(report)
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>freeal run: {html.escape(str(report["task"]))}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:1em}}</style></head><body>
<h1>freeal run: {html.escape(str(report["task"]))}</h1>
<p>{report["items"]} texts; run folder <code>{html.escape(report["run_dir"])}</code>.
Total {totals["seconds"]:.0f} s, {totals["llm_calls"]} LLM calls
({totals["llm_cache_hits"]} answers from the cache),
{totals["evaluated_tokens"]} prompt tokens evaluated of {totals["prompt_tokens"]}.
Accuracies need gold labels and are '–' without them; gold labels are used only for this page.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><small>{html.escape(CAPTION)}</small></p>
{per_type}
{figures}
</body></html>
"""
    return write_text_atomic(path, page)

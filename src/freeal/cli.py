"""The ``freeal`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from freeal.config import LLMConfig, validate
from freeal.errors import FreeALError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold an API key
    help="Label a text data set with no human in the loop (FreeAL).",
)
console = Console(stderr=True)


@app.callback()
def _commands() -> None:
    """Label a text data set with no human in the loop (FreeAL)."""


def print_metrics(report: dict, title: str) -> None:
    """Accuracy, macro-F1 and the confusion matrix as rich tables."""
    console.print(
        f"[bold]{title}[/]: accuracy {report['accuracy']:.4f}, macro-F1 {report['macro_f1']:.4f} "
        f"on {report['n']} items with gold labels ({report['abstained']} abstained)"
    )
    table = Table(title="confusion matrix (rows: gold, columns: predicted)")
    table.add_column("gold \\ predicted")
    for label in report["labels"]:
        table.add_column(label, justify="right")
    for label, row in zip(report["labels"], report["confusion"], strict=True):
        if any(row) or label != "<abstain>":
            table.add_row(label, *map(str, row))
    console.print(table)


@app.command()
def annotate(
    task: Annotated[Path, typer.Option(help="Task file (JSON/YAML) or a data folder holding task.json.")],
    data: Annotated[Path, typer.Option(help="Texts to label: .jsonl, .json, .csv or .tsv.")],
    out: Annotated[Path, typer.Option(help="Where to write the labels (JSONL).")],
    text_col: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    id_col: Annotated[
        str | None, typer.Option(help="Column holding item ids (default: row numbers).")
    ] = None,
    label_col: Annotated[
        str, typer.Option(help="Column of gold labels, used only to evaluate (ignored when absent).")
    ] = "label",
    model: Annotated[str, typer.Option(help="Embedded model name, .gguf path, or server model name.")] = (
        "qwen2.5-coder-1.5b"
    ),
    backend: Annotated[str, typer.Option(help="llamacpp (embedded) or openai (any compatible server).")] = (
        "llamacpp"
    ),
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible server URL.")] = None,
    calibrate: Annotated[
        bool | None,
        typer.Option(
            "--calibrate/--no-calibrate", help="Contextual calibration (default: measured per model)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: usable cores).")] = None,
    cache: Annotated[Path | None, typer.Option(help="SQLite cache of LLM answers.")] = None,
    limit: Annotated[int | None, typer.Option(help="Label a fixed random slice of this many items.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the slice.")] = 0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Label every text zero-shot with the LLM; print accuracy when gold labels exist."""
    from freeal.annotate import annotate as run_annotate
    from freeal.data import read_items, write_jsonl_atomic
    from freeal.llm import make_annotator
    from freeal.llm.models import MODELS
    from freeal.metrics import classification_report
    from freeal.tasks import load_task

    cfg = validate(
        LLMConfig,
        {
            "backend": backend,
            "model": model,
            "calibrate": calibrate,
            "n_threads": threads,
            "base_url": base_url,
            "cache_path": cache,
        },
        "options",
    )
    the_task = load_task(task)
    items = read_items(
        data, text_col=text_col, id_col=id_col, label_col=label_col, task=the_task, limit=limit, seed=seed
    )
    if cfg.calibrate is None:
        cfg.calibrate = MODELS[cfg.model].calibrate if cfg.model in MODELS else False
    annotator = make_annotator(cfg)
    console.print(
        f"labeling {len(items)} texts from {items.source} with {annotator.identity}"
        f" (calibration {'on' if cfg.calibrate else 'off'})"
    )
    start = time.perf_counter()
    frame = run_annotate(the_task, items, annotator, calibrate=cfg.calibrate, progress=not quiet)
    elapsed = time.perf_counter() - start
    write_jsonl_atomic(out, frame[["id", "text", "label", "confidence", "probs"]].to_dict("records"))
    ledger = annotator.ledger
    summary: dict = {
        "items": len(items),
        "model": annotator.identity,
        "calibrate": cfg.calibrate,
        "seconds": elapsed,
        "seconds_per_item": elapsed / max(len(items), 1),
        "llm": ledger.to_json(),
    }
    console.print(
        f"wrote {out}: {len(items)} labels in {elapsed:.1f} s ({summary['seconds_per_item']:.3f} s/item); "
        f"{ledger.calls} LLM calls, {ledger.cache_hits} answers from the cache, "
        f"{ledger.prompt_tokens} prompt tokens ({ledger.evaluated_tokens} evaluated), "
        f"{ledger.abstained} abstained"
    )
    if items.gold is not None:
        summary["metrics"] = classification_report(items.gold, frame["label"].tolist(), the_task.label_names)
        if summary["metrics"]["n"]:
            print_metrics(summary["metrics"], "against gold labels")
    Path(f"{out}.summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    """Entry point: one line for a user error instead of a traceback."""
    try:
        app()
    except FreeALError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None

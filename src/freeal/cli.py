"""The ``freeal`` command line."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from freeal.config import DataConfig, LLMConfig, LoopConfig, RunConfig, SLMConfig, validate
from freeal.errors import FreeALError
from freeal.extras import require
from freeal.progress import emit, mode, sayer, set_mode, slm_line

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold an API key
    help="Label a text data set with no human in the loop (FreeAL).",
)
console = Console(stderr=True)


TaskOption = Annotated[Path, typer.Option(help="Task file (JSON/YAML) or a data folder holding task.json.")]
QuietOption = Annotated[
    bool, typer.Option(help="No progress bars and no step messages; results still print.")
]
JsonLogsOption = Annotated[
    bool, typer.Option(help="Progress, messages and results as one JSON object a line on stderr.")
]


def display(quiet: bool, json_logs: bool) -> None:
    """Set the process's display: JSON lines for pipelines, silence, or rich bars (the default)."""
    if quiet and json_logs:
        raise FreeALError("choose one of --quiet and --json-logs")
    set_mode("json" if json_logs else "quiet" if quiet else "rich")
    if quiet or json_logs:  # Hugging Face's own bars (weights loading), read when transformers loads
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


TextColumnOption = Annotated[str, typer.Option(help="Column holding the text.")]
# `freeal train`'s option defaults are the configs' own, so the two cannot drift apart
_SLM = {name: field.default for name, field in SLMConfig.model_fields.items()}
_LOOP = {name: field.default for name, field in LoopConfig.model_fields.items()}


@app.callback()
def _commands() -> None:
    """Label a text data set with no human in the loop (FreeAL)."""


def print_metrics(report: dict, title: str) -> None:
    """Accuracy, macro-F1 and the confusion matrix as rich tables (a ``metrics`` line in JSON mode)."""
    if mode() == "json":
        emit("metrics", title=title, **report)
        return
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
    task: TaskOption,
    data: Annotated[Path, typer.Option(help="Texts to label: .jsonl, .json, .csv or .tsv.")],
    out: Annotated[Path, typer.Option(help="Where to write the labels (JSONL).")],
    text_col: TextColumnOption = "text",
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
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="Several servers at once: URL or URL,KEY_ENV (repeat; instead of --base-url)."),
    ] = None,
    api_key_env: Annotated[
        str, typer.Option(help="Environment variable holding the server's API key.")
    ] = "OPENAI_API_KEY",
    calibrate: Annotated[
        str, typer.Option(help="Contextual calibration: auto (chosen without gold labels), on or off.")
    ] = "auto",
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: usable cores).")] = None,
    extra_buffers: Annotated[
        str, typer.Option(help="llama.cpp repacked weight buffers: auto (off on AMX CPUs), on or off.")
    ] = "auto",
    cache: Annotated[Path | None, typer.Option(help="SQLite cache of LLM answers.")] = None,
    limit: Annotated[int | None, typer.Option(help="Label a fixed random slice of this many items.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the slice.")] = 0,
    quiet: QuietOption = False,
    json_logs: JsonLogsOption = False,
) -> None:
    """Label every text zero-shot with the LLM; print accuracy when gold labels exist."""
    from freeal.annotate import annotate as run_annotate
    from freeal.data import read_items, write_jsonl_atomic, write_text_atomic
    from freeal.llm import make_annotator
    from freeal.metrics import classification_report
    from freeal.tasks import load_task

    cfg = validate(
        LLMConfig,
        {
            "backend": backend,
            "model": model,
            "calibrate": calibrate,
            "n_threads": threads,
            "extra_buffers": extra_buffers,
            "base_url": base_url,
            "api_key_env": api_key_env,
            "endpoints": [
                dict(zip(("base_url", "api_key_env"), e.split(",", 1), strict=False)) for e in endpoint
            ]
            if endpoint
            else None,
            "cache_path": cache,
        },
        "options",
    )
    display(quiet, json_logs)
    say = sayer(console.print)
    the_task = load_task(task)
    the_task.require_classification("`freeal annotate`")
    items = read_items(
        data, text_col=text_col, id_col=id_col, label_col=label_col, task=the_task, limit=limit, seed=seed
    )
    annotator = make_annotator(cfg)
    say(
        f"labeling {len(items)} texts from {items.source} with {annotator.identity}"
        f" (calibration {cfg.calibrate})"
    )
    start = time.perf_counter()
    frame = run_annotate(the_task, items, annotator, calibrate=cfg.calibrate, progress=not quiet)
    elapsed = time.perf_counter() - start
    kept = frame[["id", "text", "label", "confidence", "probs"]]
    # an abstention is null in the file (pandas would write NaN, which is not JSON)
    write_jsonl_atomic(out, kept.astype(object).where(kept.notna(), None).to_dict("records"))
    ledger = annotator.ledger
    summary: dict = {
        "items": len(items),
        "model": annotator.identity,
        "calibrate": cfg.calibrate,
        "calibrated": frame.attrs["calibrated"],
        "seconds": elapsed,
        "seconds_per_item": elapsed / max(len(items), 1),
        "llm": ledger.to_json(),
    }
    say(
        f"wrote {out}: {len(items)} labels in {elapsed:.1f} s ({summary['seconds_per_item']:.3f} s/item); "
        f"{ledger.calls} LLM calls, {ledger.cache_hits} answers from the cache, "
        f"{ledger.prompt_tokens} prompt tokens ({ledger.evaluated_tokens} evaluated), "
        f"{ledger.abstained} abstained"
    )
    counts = frame["label"].fillna("<abstain>").value_counts()
    summary["predicted_distribution"] = {str(k): int(v) for k, v in counts.items()}
    say(f"calibration applied: {'yes' if frame.attrs['calibrated'] else 'no'}")
    say("predicted labels: " + ", ".join(f"{k} {v / len(items):.1%}" for k, v in counts.items()))
    if items.gold is not None:
        summary["metrics"] = classification_report(items.gold, frame["label"].tolist(), the_task.label_names)
        if summary["metrics"]["n"]:
            print_metrics(summary["metrics"], "against gold labels")
    write_text_atomic(f"{out}.summary.json", json.dumps(summary, indent=2))
    if mode() == "json":
        emit("done", labels=str(out), summary=f"{out}.summary.json")


@app.command()
def train(
    task: TaskOption,
    data: Annotated[Path, typer.Option(help="Texts with noisy labels (e.g. the output of `annotate`).")],
    out: Annotated[Path, typer.Option(help="Folder for the model, predictions and feedback.")],
    text_col: TextColumnOption = "text",
    id_col: Annotated[str | None, typer.Option(help="Column holding item ids.")] = "id",
    label_col: Annotated[str, typer.Option(help="Column of noisy labels (null = abstained).")] = "label",
    views_col: Annotated[
        str | None, typer.Option(help="Column of augmented texts (e.g. back-translations).")
    ] = None,
    gold_col: Annotated[str | None, typer.Option(help="Column of gold labels, only to evaluate.")] = None,
    test: Annotated[
        Path | None, typer.Option(help="Held-out texts with gold labels (inductive accuracy).")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="linear (logistic regression on frozen layer means), head (MLP on frozen vectors) "
            "or finetune (whole encoder)."
        ),
    ] = _SLM["mode"],
    robust: Annotated[
        bool, typer.Option("--robust/--plain", help="Robust self-training or plain CE.")
    ] = True,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = _SLM["epochs"],
    warmup_epochs: Annotated[
        int,
        typer.Option(
            help="Epochs of plain cross-entropy on every label before the clean/noisy split "
            "begins (with fewer --epochs, training is plain throughout)."
        ),
    ] = _SLM["warmup_epochs"],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Encoder: all-minilm-l6-v2, all-mpnet-base-v2, or a local folder (default: as `run`, "
            "mpnet for head, MiniLM for finetune)."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = _SLM["device"],
    clean_fraction: Annotated[
        float, typer.Option(help="Per-class share of items for the clean set.")
    ] = _LOOP["clean_fraction"],
    pool_size: Annotated[
        int,
        typer.Option(help="Demonstration pool size (balanced over classes)."),
    ] = _LOOP["pool_size"],
    k: Annotated[int, typer.Option(help="Nearest demonstrations listed per noisy item.")] = _LOOP["k"],
    seed: Annotated[int, typer.Option(help="Random seed.")] = _SLM["seed"],
) -> None:
    """Train the SLM robustly on noisy labels; write predictions, the clean split and demonstrations."""
    require("torch", "transformers", "sentence_transformers", what="`freeal train`")
    from freeal.data import read_items, write_jsonl_atomic, write_text_atomic
    from freeal.demos import nearest_demonstrations
    from freeal.embed import Embedder
    from freeal.feedback import feedback
    from freeal.kinds.classification import slm_class
    from freeal.metrics import classification_report
    from freeal.tasks import load_task

    cfg = validate(
        SLMConfig,
        {
            "mode": mode,
            "robust": robust,
            "epochs": epochs,
            "warmup_epochs": warmup_epochs,
            "backbone": backbone,
            "device": device,
            "seed": seed,
        },
        "options",
    )
    the_task = load_task(task)
    the_task.require_classification("`freeal train`")
    from freeal.kinds import kind_of

    cfg = kind_of(the_task).with_backbone(cfg)  # SLMConfig is validated: pick as the loop does
    items = read_items(
        data,
        text_col=text_col,
        id_col=id_col,
        label_col=gold_col,  # gold, read only to score
        given_col=label_col,  # the labels to learn from
        keep=(views_col,) if views_col else (),
        task=the_task,
    )
    if items.given is None:
        raise FreeALError(f"{items.source}: no column {label_col!r} of labels to learn from")
    if gold_col and items.gold is None:
        raise FreeALError(f"{items.source}: no column {gold_col!r} of gold labels")
    noisy = items.given
    views = items.extra.get(views_col) if views_col else None

    slm = slm_class(cfg.mode)(the_task.label_names, cfg)

    def show(entry: dict) -> None:
        if slm.main_process:  # under `accelerate launch`, the first process reports
            console.print(slm_line(entry, cfg))

    slm.fit(items.texts, noisy, views=views, on_epoch=show)
    if not slm.main_process:  # ... and writes the results
        return
    slm.save(out / "model")
    predicted = [the_task.label_names[i] for i in slm.train_proba_.argmax(1)]
    embedder = Embedder(device=device)
    vectors = embedder.encode(items.texts)
    fb = feedback(
        noisy,
        [g is not None and g == p for g, p in zip(noisy, predicted, strict=True)],
        ~slm.clean_mask_,
        slm.mean_loss_,
        vectors,
        fraction=clean_fraction,
        pool_size=pool_size,
        seed=seed,
    )
    pool = fb.pool_indices
    nearest = nearest_demonstrations(vectors, vectors[pool], [d.label for d in fb.pool], k=k)
    in_clean = np.zeros(len(items), dtype=bool)
    in_clean[fb.clean] = True
    rows = [
        {
            "id": items.ids[i],
            "text": items.texts[i],
            "given": noisy[i],
            "predicted": predicted[i],
            "probs": dict(zip(the_task.label_names, slm.train_proba_[i].tolist(), strict=True)),
            "clean": bool(slm.clean_mask_[i]),
            "clean_prob": float(slm.clean_prob_[i]),
            "in_clean_set": bool(in_clean[i]),
            "demonstrations": [items.ids[pool[j]] for j in nearest[i]] if not slm.clean_mask_[i] else [],
        }
        for i in range(len(items))
    ]
    write_jsonl_atomic(out / "predictions.jsonl", rows)
    write_jsonl_atomic(
        out / "demonstrations.jsonl",
        [{"id": items.ids[d.index], "text": items.texts[d.index], **d.to_json()} for d in fb.pool],
    )
    metrics: dict = {
        "epochs": slm.epoch_log,
        "clean_share": float(slm.clean_mask_.mean()),
        "clean_set": len(fb.clean),
        "pool": len(fb.pool),
    }
    if items.gold is not None:
        gold = items.gold
        metrics["transductive"] = classification_report(gold, predicted, the_task.label_names)
        print_metrics(metrics["transductive"], "SLM on the training texts")
        metrics["clean_set_precision"] = float(np.mean([noisy[i] == gold[i] for i in fb.clean]))
        console.print(f"clean set: {len(fb.clean)} items, {metrics['clean_set_precision']:.4f} right")
    if test is not None:
        held_out = read_items(test, task=the_task)
        if held_out.gold is None:
            raise FreeALError(f"{held_out.source}: the test set needs gold labels")
        metrics["inductive"] = classification_report(
            held_out.gold, slm.predict(held_out.texts), the_task.label_names
        )
        print_metrics(metrics["inductive"], "SLM on the test set")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    console.print(f"wrote {out}: model/, predictions.jsonl, demonstrations.jsonl, metrics.json")


def load_run_config(path: Path) -> RunConfig:
    """Read and validate a run config; relative paths are relative to the config file's folder.

    Everything is checked here, before any model is loaded: unknown keys, bad values, missing files.
    """
    import yaml

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise FreeALError(f"{path}: cannot read the run config ({exc})") from exc
    if not isinstance(raw, dict):
        raise FreeALError(f"{path}: a run config must be a mapping (task, data, out, llm, slm, loop)")
    cfg = validate(RunConfig, raw, str(path))
    base = path.resolve().parent

    def here(p: Path) -> Path:
        return p if p.is_absolute() else (base / p).resolve()

    cfg.data.path = here(cfg.data.path)
    cfg.out = here(cfg.out)
    if isinstance(cfg.task, Path):
        cfg.task = here(cfg.task)
    if cfg.test is not None:
        cfg.test.path = here(cfg.test.path)
    if cfg.llm.cache_path is not None:
        cfg.llm.cache_path = here(cfg.llm.cache_path)
    for what, p in (("data.path", cfg.data.path), ("test.path", cfg.test.path if cfg.test else None)):
        if p is not None and not p.exists():
            raise FreeALError(f"{path}: {what}: no such file or dataset folder {p}")
    return cfg


def read_config_data(config: Path) -> tuple[RunConfig, Any, Any, Any]:
    """A run config's settings, task, texts and test set, all checked before any model loads."""
    from freeal.data import read_items, read_sentences
    from freeal.tasks import load_task, task_from_dict

    cfg = load_run_config(config)
    the_task = load_task(cfg.task) if isinstance(cfg.task, Path) else task_from_dict(cfg.task, str(config))

    def read(d: DataConfig):  # type: ignore[no-untyped-def]
        if the_task.kind == "ner":  # tokens + tags (label_col names the tags field), or text
            tags_key = "tags" if d.label_col == "label" else d.label_col
            return read_sentences(d.path, task=the_task, tags_key=tags_key, limit=d.limit, seed=d.seed)
        return read_items(
            d.path,
            text_col=d.text_col,
            id_col=d.id_col,
            label_col=d.label_col,
            task=the_task,
            limit=d.limit,
            seed=d.seed,
        )

    items = read(cfg.data)
    test = read(cfg.test) if cfg.test else None
    if cfg.test is not None and test is not None and test.gold is None:
        raise FreeALError(f"{test.source}: the test set needs gold labels (column {cfg.test.label_col!r})")
    return cfg, the_task, items, test


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (YAML/JSON): task, data, out, llm, slm, loop.")],
    out: Annotated[Path | None, typer.Option(help="Run folder (overrides the config's `out`).")] = None,
    quiet: QuietOption = False,
    json_logs: JsonLogsOption = False,
    dry_run: Annotated[bool, typer.Option(help="Print the run's plan (as `freeal plan`) and stop.")] = False,
) -> None:
    """Run the FreeAL loop (or resume it in its run folder); print the per-round report."""
    from rich.table import Table

    from freeal.loop import FreeAL
    from freeal.report import table, type_rows

    if dry_run:
        plan(config, json_out=None, price_in=None, price_out=None)
        return
    display(quiet, json_logs)
    say = sayer(console.print)
    cfg, the_task, items, test = read_config_data(config)
    run_dir = out or cfg.out
    loop = FreeAL(the_task, cfg.llm, cfg.slm, cfg.loop, run_dir=run_dir, progress=not quiet, say=say)
    say(f"{len(items)} {loop.kind.unit} from {items.source}; run folder {run_dir}")
    try:
        loop.fit(items, test=test)
    except KeyboardInterrupt:
        say("interrupted: finished steps and LLM answers are kept; run the same command to resume")
        raise typer.Exit(130) from None
    if mode() == "json":
        final = loop.report_.get("final") or {}
        emit(
            "done",
            labels=str(run_dir / "labels.jsonl"),
            report=str(run_dir / "report.html"),
            metrics=final.get("metrics"),
            totals=loop.report_.get("totals"),
        )
        return
    # a log file or a pipe gets the whole table, not one squeezed to rich's default 80 columns
    shown = console if console.is_terminal else Console(stderr=True, width=180)
    shown.print(table(loop.report_))
    for note in loop.report_.get("notes", []):
        console.print(note, soft_wrap=True)
    kinds_head, kinds_rows = type_rows(loop.report_)
    if kinds_rows:  # NER: the labels' entity scores per type
        per_type = Table(title="entities per type (labels against gold)")
        for col in kinds_head:
            per_type.add_column(col, justify="left" if col == "stage" else "right")
        for row in kinds_rows:
            per_type.add_row(*row)
        shown.print(per_type)
    console.print(f"labels: {run_dir / 'labels.jsonl'}", soft_wrap=True)
    console.print(f"model: {loop.slm_path_}", soft_wrap=True)
    console.print(f"report: {run_dir / 'report.html'}", soft_wrap=True)


@app.command()
def plan(
    config: Annotated[Path, typer.Argument(help="Run config (YAML/JSON), as for `freeal run`.")],
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the plan here.")] = None,
    price_in: Annotated[
        float | None, typer.Option(help="Price per 1M tokens sent, for a served model (prints a cost).")
    ] = None,
    price_out: Annotated[float | None, typer.Option(help="Price per 1M tokens generated.")] = None,
) -> None:
    """What a run of CONFIG will cost, per stage, before paying for it: LLM calls, tokens, time on
    this machine (from a few timed probe calls) and disk. Nothing is written to the run folder."""
    from freeal.llm import make_annotator
    from freeal.plan import plan_run

    cfg, the_task, items, _ = read_config_data(config)
    console.print(f"planning a run over {len(items)} items of {items.source}: timing a few probe calls")
    prices = (price_in or 0.0, price_out or 0.0) if price_in is not None or price_out is not None else None
    found = plan_run(
        the_task,
        items,
        cfg.llm,
        cfg.slm,
        cfg.loop,
        annotator=make_annotator(cfg.llm),
        price_per_million=prices,
    )
    shown = Table(title=f"plan: {found['items']} {found['unit']} with {found['model']}")
    for col in ("stage", "LLM calls", "tokens sent", "tokens evaluated", "minutes"):
        shown.add_column(col, justify="left" if col == "stage" else "right")
    for stage in [*found["stages"], found["total"]]:
        shown.add_row(
            stage["name"],
            f"{stage['calls']:,}",
            f"{stage['sent_tokens']:,}",
            f"{stage['evaluated_tokens']:,}",
            f"{stage['seconds'] / 60:.1f}",
        )
    console.print(shown)
    low, high = (s / 60 for s in found["seconds_range"])
    console.print(
        f"refinery assumed to ask {found['assumed_noisy_share']:.0%} of the {found['unit']} a round "
        f"({found['noisy_share_range'][0]:.0%}-{found['noisy_share_range'][1]:.0%} measured): "
        f"{low:.1f}-{high:.1f} minutes; run folder about {found['disk_mb']:.0f} MB"
    )
    if "cost" in found:
        console.print(f"cost at the given prices: {found['cost']:.2f}")
    if json_out is not None:
        from freeal.data import write_text_atomic

        write_text_atomic(json_out, json.dumps(found, indent=2))


@app.command()
def doctor(
    model: Annotated[
        list[str] | None,
        typer.Option(help="Model name or .gguf path (repeat; default: every installed one)."),
    ] = None,
    speed: Annotated[bool, typer.Option(help="Also time prefill in 512- and 32-token batches.")] = True,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: usable cores).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the findings here.")] = None,
) -> None:
    """Check that llama.cpp runs on this CPU: load each model in a child process with its extra
    weight buffers on and off, decode, time prefill; say which setting freeal will use."""
    require("llama_cpp", what="`freeal doctor`")
    from freeal.llm.models import MODELS, resolve_model
    from freeal.llm.native import (
        ENV_VAR,
        build_info,
        cpu_flags,
        describe_cpu,
        extra_buffers_decision,
        run_child,
    )

    info = build_info()
    chosen, why = extra_buffers_decision("auto")
    console.print(f"CPU: {describe_cpu()}", soft_wrap=True)
    console.print(
        f"llama-cpp-python {info['llama_cpp_python']}; llama.cpp: {info['system_info']}", soft_wrap=True
    )
    console.print(
        f"extra weight buffers: {'on' if chosen else 'off'} under auto ({why}; "
        f"override with llm.extra_buffers or {ENV_VAR})"
    )
    names = model or []
    if not names:  # every embedded model whose packages are installed
        for name in MODELS:
            try:
                resolve_model(name)
            except FreeALError as exc:
                console.print(f"{name}: not installed ({exc})")
                continue
            names.append(name)
    table = Table(title="llama.cpp on this CPU (each row a fresh child process)")
    for col in ("model", "extra buffers", "result", "load s", "prefill tok/s (512)", "prefill tok/s (32)"):
        table.add_column(col, justify="left" if col in ("model", "result") else "right")
    findings: dict = {
        "cpu": describe_cpu(),
        "flags": sorted(cpu_flags()),
        **info,
        "auto_extra_buffers": chosen,
        "models": {},
    }
    broken = False
    for name in names:
        path, _ = resolve_model(name)
        for enabled in (True, False):
            found = run_child(path, extra_buffers=enabled, speed=speed, threads=threads)
            findings["models"].setdefault(name, {})["on" if enabled else "off"] = found
            crashed = found.get("crashed")
            broken |= bool(crashed) and enabled == chosen
            table.add_row(
                name,
                "on" if enabled else "off",
                f"[red]crashed: {crashed}[/]" if crashed else "ok",
                "" if crashed else f"{found['load_seconds']:.1f}",
                f"{found['prefill_512_tps']:.1f}" if "prefill_512_tps" in found else "",
                f"{found['prefill_32_tps']:.1f}" if "prefill_32_tps" in found else "",
            )
    console.print(table)
    if json_out is not None:
        from freeal.data import write_text_atomic

        write_text_atomic(json_out, json.dumps(findings, indent=2))
    if broken:
        console.print(
            f"[red]llama.cpp crashes on this CPU with the setting freeal would use[/]: set {ENV_VAR} or "
            "llm.extra_buffers to the working one above, or rebuild llama-cpp-python (README)"
        )
        raise typer.Exit(1)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Embedded model name or .gguf path.")] = "qwen2.5-coder-1.5b",
    host: Annotated[
        str, typer.Option(help="Address to listen on (keep 127.0.0.1 unless it must be reached).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    n_ctx: Annotated[int, typer.Option(help="Context size in tokens.")] = 4096,
    threads: Annotated[int | None, typer.Option(help="llama.cpp threads (default: usable cores).")] = None,
    extra_buffers: Annotated[
        str,
        typer.Option(help="llama.cpp repacked weight buffers: auto (off on AMX/AVX-512 CPUs), on or off."),
    ] = "auto",
) -> None:
    """Serve a model over the OpenAI API (llama-cpp-python's server), loaded as freeal loads it:
    checked in a child process first, with the extra weight buffers chosen for this CPU."""
    require("llama_cpp", "uvicorn", "fastapi", what="`freeal serve`")
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from freeal.config import LLMConfig
    from freeal.llm.llamacpp import default_threads
    from freeal.llm.models import resolve_model
    from freeal.llm.native import checked_extra_buffers, extra_buffers_set

    setting = validate(LLMConfig, {"extra_buffers": extra_buffers}, "options").extra_buffers  # type: ignore[attr-defined]
    path, name = resolve_model(model)
    enabled = checked_extra_buffers(path, setting, identity=name)
    n = threads or default_threads()
    with extra_buffers_set(enabled):  # the server loads its model inside create_app
        server = create_app(
            server_settings=ServerSettings(host=host, port=port),
            model_settings=[
                ModelSettings(
                    model=str(path),
                    model_alias=model,
                    n_ctx=n_ctx,
                    n_threads=n,
                    n_threads_batch=n,
                    verbose=False,
                )
            ],
        )
    console.print(
        f"serving {name} as model {model!r} on http://{host}:{port}/v1 "
        f"(extra buffers {'on' if enabled else 'off'})"
    )
    uvicorn.run(server, host=host, port=port, log_level="warning")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A finished run folder (holding labels.jsonl).")],
    to: Annotated[str, typer.Option(help="label-studio, argilla, datasets (Hugging Face) or csv.")],
    only_noisy: Annotated[
        bool, typer.Option(help="Only the items the SLM flagged noisy (clean: false).")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the most doubtful N items.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="File (label-studio, csv) or folder (argilla, datasets); default RUN/export/."),
    ] = None,
) -> None:
    """Export the run's final labels for a person to check, lowest confidence first."""
    from freeal.export import export_run

    done = export_run(run, to, only_noisy=only_noisy, limit=limit, out=out)
    console.print(f"wrote {done.items} items to {done.path}", soft_wrap=True)
    if done.config is not None:
        console.print(
            f"Label Studio labeling config (create the project with it): {done.config}", soft_wrap=True
        )
    if to == "argilla":
        console.print(
            f"upload with: rg.Dataset.from_disk({str(done.path)!r}, client=rg.Argilla(...))", soft_wrap=True
        )


@app.command("import")
def import_(
    run: Annotated[Path, typer.Argument(help="The run folder the reviewed items were exported from.")],
    file: Annotated[
        Path, typer.Argument(help="The reviewed project's export (Label Studio: Export > JSON).")
    ],
    source: Annotated[str, typer.Option("--from", help="The tool that made FILE: label-studio.")],
) -> None:
    """Import a person's labels: kept in RUN/human/, final in labels.jsonl, never asked again."""
    from freeal.export import import_corrections

    if source != "label-studio":
        raise FreeALError(f"--from {source!r}: only label-studio exports can be imported")
    done = import_corrections(run, file)
    console.print(
        f"imported {done.corrections} labels from {file} ({done.changed} differ from freeal's; "
        f"{done.skipped} tasks had no submitted annotation); {done.total} in {done.path}",
        soft_wrap=True,
    )


def main() -> None:
    """Entry point: one line for a user error instead of a traceback."""
    try:
        app()
    except FreeALError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise SystemExit(2) from None

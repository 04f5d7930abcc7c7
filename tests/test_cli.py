"""The command line: annotate (with resume after a kill), train, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from freeal.cli import app
from freeal.data import read_items, read_jsonl, write_jsonl_atomic
from freeal.errors import FreeALError

FREEAL = [sys.executable, "-m", "freeal"]


def cached_answers(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    except sqlite3.OperationalError:  # table not created yet
        return 0


def annotate_sst2(data_dir: Path, tmp_path: Path, n: int) -> list[str]:
    """``freeal annotate`` on n SST-2 test texts with the 135M model, cache and labels in tmp_path."""
    return [
        *FREEAL,
        "annotate",
        "--task",
        str(data_dir / "sst2"),
        "--data",
        str(data_dir / "sst2" / "test.jsonl"),
        "--limit",
        str(n),
        "--model",
        "smollm2-135m",
        "--calibrate",
        "off",
        "--cache",
        str(tmp_path / "cache.sqlite"),
        "--out",
        str(tmp_path / "labels.jsonl"),
    ]


def test_killed_annotate_resumes_without_repeating_llm_calls(data_dir, tmp_path):
    n = 60
    cache, out = tmp_path / "cache.sqlite", tmp_path / "labels.jsonl"
    args = [*annotate_sst2(data_dir, tmp_path, n), "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while cached_answers(cache) < 15 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = cached_answers(cache)
    assert 15 <= done < n, "the run should have been killed midway"
    assert not out.exists()

    subprocess.run(args, check=True, capture_output=True)
    summary = json.loads(Path(f"{out}.summary.json").read_text())
    unique = len(set(read_items(data_dir / "sst2" / "test.jsonl", limit=n, seed=0).texts))
    assert summary["llm"]["calls"] == unique - done
    assert summary["llm"]["cache_hits"] == n - summary["llm"]["calls"]
    rows = read_jsonl(out)
    assert len(rows) == n and {r["label"] for r in rows} <= {"negative", "positive"}

    subprocess.run(args, check=True, capture_output=True)  # a third run pays nothing
    assert json.loads(Path(f"{out}.summary.json").read_text())["llm"]["calls"] == 0


def test_bad_input_is_one_clear_line(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"sentence": "no text key"}\n')
    result = subprocess.run(
        [
            *FREEAL,
            "annotate",
            "--task",
            str(data_dir / "sst2"),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "row 2" in result.stderr and "text" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_writes_predictions_clean_split_and_demonstrations(data_dir, tmp_path):
    items = read_items(data_dir / "sst2" / "train.jsonl", limit=300, seed=9)
    rng = np.random.default_rng(9)
    flip = rng.random(len(items)) < 0.2
    rows = [
        {
            "id": f"s{i}",
            "text": t,
            "label": ("positive" if g == "negative" else "negative") if f else g,
            "gold": g,
        }
        for i, (t, g, f) in enumerate(zip(items.texts, items.gold, flip, strict=True))
    ]
    write_jsonl_atomic(tmp_path / "noisy.jsonl", rows)
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--task",
            str(data_dir / "sst2"),
            "--data",
            str(tmp_path / "noisy.jsonl"),
            "--out",
            str(tmp_path / "slm"),
            "--gold-col",
            "gold",
            "--epochs",
            "20",
            "--warmup-epochs",
            "3",
            "--device",
            "cpu",
            "--pool-size",
            "10",
            "--k",
            "4",
            "--test",
            str(data_dir / "sst2" / "dev.jsonl"),
        ],
    )
    assert result.exit_code == 0, result.output
    predictions = read_jsonl(tmp_path / "slm" / "predictions.jsonl")
    demos = read_jsonl(tmp_path / "slm" / "demonstrations.jsonl")
    metrics = json.loads((tmp_path / "slm" / "metrics.json").read_text())
    assert len(predictions) == 300 and len(demos) == 10
    assert {d["label"] for d in demos} == {"negative", "positive"}
    noisy_rows = [p for p in predictions if not p["clean"]]
    assert noisy_rows and all(len(p["demonstrations"]) == 4 for p in noisy_rows)
    assert metrics["inductive"]["accuracy"] > 0.6
    assert metrics["clean_set_precision"] > 0.8  # the noisy input is 80% right
    assert (tmp_path / "slm" / "model" / "model.pt").is_file()
    saved = json.loads((tmp_path / "slm" / "model" / "slm.json").read_text())["config"]
    assert (saved["epochs"], saved["warmup_epochs"]) == (20, 3)  # the options reach the model


def test_json_logs_are_one_object_a_line_and_quiet_prints_no_progress(data_dir, tmp_path):
    args = annotate_sst2(data_dir, tmp_path, 12)
    logged = subprocess.run([*args, "--json-logs"], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in logged.stderr.splitlines()]  # every line is JSON
    events = [line["event"] for line in lines]
    assert "message" in events and events[-1] == "done" and logged.stdout == ""
    progress = [line for line in lines if line["event"] == "progress"]
    assert progress[-1]["done"] == progress[-1]["total"] == 12 and progress[-1]["seconds_left"] == 0
    assert lines[-1]["labels"] == str(tmp_path / "labels.jsonl")

    quiet = subprocess.run([*args, "--quiet"], capture_output=True, text=True, check=True)
    assert "labeling" not in quiet.stderr and "12/12" not in quiet.stderr  # answers come from the cache
    assert "accuracy" in quiet.stderr  # results still print

    both = CliRunner().invoke(app, [*args[3:], "--quiet", "--json-logs"])
    assert isinstance(both.exception, FreeALError) and "choose one of --quiet" in str(both.exception)


def test_plan_and_dry_run_print_the_stages_and_run_nothing(data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {
                "task": str(data_dir / "sst2"),
                "data": {"path": str(data_dir / "sst2" / "train.jsonl"), "limit": 40},
                "out": str(tmp_path / "run"),
                "llm": {"model": "smollm2-135m", "cache_path": str(tmp_path / "cache.sqlite")},
                "slm": {"backbone": "all-minilm-l6-v2", "epochs": 2, "warmup_epochs": 1, "cross_fit": 0},
                "loop": {"refinery_rounds": 1},
            }
        )
    )
    plan = tmp_path / "plan.json"
    done = subprocess.run(
        [*FREEAL, "plan", str(config), "--json", str(plan), "--price-in", "1", "--price-out", "2"],
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(plan.read_text())
    assert [s["name"] for s in found["stages"]][1:] == [
        "round 0 (every item)", "round 0 SLM", "round 1 refinery", "round 1 SLM", "SLM on the final labels",
    ]  # fmt: skip
    assert found["stages"][1]["calls"] >= 40 and found["total"]["seconds"] > 0 and "cost" in found
    assert "round 1 refinery" in done.stderr and "cost at the given prices" in done.stderr
    dry = subprocess.run(
        [*FREEAL, "run", str(config), "--dry-run"], capture_output=True, text=True, check=True
    )
    assert "round 0 (every item)" in dry.stderr
    assert not (tmp_path / "run").exists() and cached_answers(tmp_path / "cache.sqlite") == 0  # nothing ran

"""A real OpenAI-compatible server: `freeal serve` (llama-cpp-python's own server) with SmolLM2 on
127.0.0.1, started and killed by the tests. It answers label scoring (logprobs), the loop's
demonstration writing and NER entity lists (JSON), and survives a SIGKILL mid-run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from freeal.annotate import annotate
from freeal.cli import app
from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.data import read_items, read_jsonl, read_sentences
from freeal.llm import make_annotator
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.openai_compat import OpenAICompatAnnotator
from freeal.llm.prompts import classification_prompt
from freeal.loop import FreeAL
from freeal.ner_annotate import annotate_sentences
from freeal.tasks import load_task

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
FREEAL = [sys.executable, "-m", "freeal"]


class Server:
    """``freeal serve`` in a child process on a free loopback port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        command = [*FREEAL, "serve", MODEL, "--port", str(self.port), "--n-ctx", "2048"]
        # the server's log goes to a file: a pipe nobody reads fills at 64 KB and then blocks the
        # server on its next log line (how bench/served.py's llama-server run stalled)
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the server's lifetime, not a block's
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"freeal serve exited: {log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("freeal serve did not answer in time")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture(scope="module")
def server():  # type: ignore[no-untyped-def]
    found = Server()
    found.start()
    yield found
    if found.proc is not None and found.proc.poll() is None:
        found.kill()


@pytest.fixture(scope="module")
def sst2(data_dir):  # type: ignore[no-untyped-def]
    task = load_task(data_dir / "sst2")
    return task, read_items(data_dir / "sst2" / "test.jsonl", task=task, limit=30, seed=3)


def served(server: Server, cache, **kw) -> CachedAnnotator:  # type: ignore[no-untyped-def]
    cfg = LLMConfig(backend="openai", model=MODEL, base_url=server.url, cache_path=cache, **kw)
    return make_annotator(cfg)


def test_served_labels_match_the_embedded_model(server, sst2, smollm2, tmp_path):
    task, items = sst2
    remote = annotate(task, items, served(server, tmp_path / "a.sqlite"), calibrate="off", progress=False)
    embedded = CachedAnnotator(smollm2, CallCache(tmp_path / "b.sqlite"))
    local = annotate(task, items, embedded, calibrate="off", progress=False)
    assert remote["probs"].map(lambda p: isinstance(p, dict)).all()  # every answer from logprobs
    assert remote["label"].tolist() == local["label"].tolist()
    remote_p = np.array([p["positive"] for p in remote["probs"]])
    local_p = np.array([p["positive"] for p in local["probs"]])
    # same model, other batching (the server evaluates prompts its own way): close, not bit-equal
    assert np.abs(remote_p - local_p).mean() < 0.05


def test_annotate_command_on_several_endpoints(server, data_dir, tmp_path):
    out = tmp_path / "labels.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "annotate",
            "--task",
            str(data_dir / "sst2"),
            "--data",
            str(data_dir / "sst2" / "test.jsonl"),
            "--limit",
            "8",
            "--out",
            str(out),
            "--backend",
            "openai",
            "--model",
            MODEL,
            "--endpoint",
            server.url,
            "--endpoint",
            f"{server.url},OTHER_SERVER_KEY",
            "--calibrate",
            "off",
            "--cache",
            str(tmp_path / "c.sqlite"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = read_jsonl(out)
    assert len(rows) == 8 and all(r["label"] in ("negative", "positive") for r in rows)


def test_a_server_killed_mid_run_loses_nothing_and_is_never_paid_twice(server, sst2, tmp_path):
    task, items = sst2
    inner = OpenAICompatAnnotator(
        MODEL, base_url=server.url, max_retries=12, backoff_base=0.3, backoff_max=3, max_concurrency=2
    )
    cached = CachedAnnotator(inner, CallCache(tmp_path / "cache.sqlite"))
    prompts = [classification_prompt(task, t) for t in items.texts]
    answers = {}
    restarted = threading.Thread(target=server.start)
    for i, answer in cached.score_many(prompts, task.label_names):
        answers[i] = answer
        if len(answers) == 10:
            server.kill()  # mid-run, with requests in flight
            restarted.start()
    restarted.join()
    assert sorted(answers) == list(range(len(prompts)))
    assert all(a.label in task.label_names or a.label is None for a in answers.values())
    assert cached.ledger.calls == len(prompts) and len(cached.cache) == len(prompts)
    again = CachedAnnotator(inner, CallCache(tmp_path / "cache.sqlite"))
    assert len(dict(again.score_many(prompts, task.label_names))) == len(prompts)
    assert again.ledger.calls == 0  # every answer is paid once


def test_the_loop_writes_demonstrations_through_the_server(server, data_dir, tmp_path):
    task = load_task(data_dir / "trec")
    items = read_items(data_dir / "trec" / "train.jsonl", task=task, limit=18, seed=1)
    runner = FreeAL(
        task,
        LLMConfig(backend="openai", model=MODEL, base_url=server.url, cache_path=tmp_path / "c.sqlite"),
        SLMConfig(mode="head", backbone="all-minilm-l6-v2", epochs=3, warmup_epochs=1, device="cpu"),
        LoopConfig(
            initial_demos="generated",
            demos_per_label=2,
            demos_per_call=2,
            max_calls_per_label=8,
            verify_demos=False,
            k=4,
            group_size=9,
            refinery_rounds=1,
            min_change=0,
        ),
        run_dir=tmp_path / "run",
        progress=False,
    )
    frame = runner.fit(items)
    demos = json.loads((runner.run_dir / "demos" / "step.json").read_text())
    assert demos["calls"] > 0 and demos["llm_usage"]["calls"] == demos["calls"]
    assert len(frame) == 18 and frame["label"].notna().any()


def test_ner_entity_lists_come_back_as_json_through_the_server(server, data_dir, tmp_path):
    task = load_task(data_dir / "bc5cdr")
    sentences = read_sentences(data_dir / "bc5cdr" / "train.jsonl", task=task, limit=6, seed=0)
    annotator = served(server, tmp_path / "c.sqlite")
    assert not annotator.supports_grammar  # a server gets the JSON prompt and the strict parser
    found = annotate_sentences(
        task, sentences.tokens, annotator, [(np.arange(6), [])], progress=False, description="ner"
    )
    assert annotator.ledger.calls >= 6
    answered = [s for s in found.spans if s is not None]
    assert all(kind in task.label_names for spans in answered for kind, _, _ in spans)
    assert found.stats()["unaligned"] >= 0

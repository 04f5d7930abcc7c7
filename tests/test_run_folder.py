"""The run folder's and the cache's promises: each test here failed before its fix (issue 10)."""

from __future__ import annotations

import sqlite3
import threading

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from freeal.cli import app
from freeal.config import LLMConfig, LoopConfig, SLMConfig, validate
from freeal.data import read_items, read_jsonl
from freeal.errors import FreeALError
from freeal.llm import annotator_identity
from freeal.llm.base import LabelScores
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.openai_compat import OpenAICompatAnnotator
from freeal.loop import FreeAL, fingerprint
from freeal.slm.classifier import SLMClassifier
from freeal.tasks import Task, load_task

SLM = SLMConfig(mode="head", backbone="all-minilm-l6-v2", epochs=4, warmup_epochs=1, device="cpu")
ZERO_SHOT_START = LoopConfig(
    initial_demos="none", refinery_rounds=1, min_change=0, k=4, group_size=12, min_kappa=-1.0
)


@pytest.fixture(scope="module")
def trec(data_dir):
    task = load_task(data_dir / "trec")
    return task, read_items(data_dir / "trec" / "train.jsonl", task=task, limit=24, seed=1)


class AbstainsWhenTold:
    """The real annotator, except that it abstains (no label at all) once ``abstain`` is set."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.identity, self.abstain = inner, inner.identity + "+abstains", False

    def score_many(self, prompts, labels):  # type: ignore[no-untyped-def]
        if not self.abstain:
            yield from self.inner.score_many(prompts, labels)
            return
        for i in range(len(prompts)):
            yield i, LabelScores(label=None, scores=None)

    def generate_many(self, prompts, **kw):  # type: ignore[no-untyped-def]
        return self.inner.generate_many(prompts, **kw)


def test_a_refinery_abstention_keeps_the_earlier_label(trec, smollm2, tmp_path):
    task, items = trec
    inner = AbstainsWhenTold(smollm2)

    def say(message: str) -> None:
        if message.startswith("step round-1/llm"):
            inner.abstain = True

    annotator = CachedAnnotator(inner, CallCache(tmp_path / "cache.sqlite"))
    runner = FreeAL(
        task,
        slm=SLM,
        loop=ZERO_SHOT_START,
        run_dir=tmp_path / "run",
        annotator=annotator,
        progress=False,
        say=say,
    )
    frame = runner.fit(items)
    before = read_jsonl(runner.run_dir / "round-0/llm/labels.jsonl")
    after = read_jsonl(runner.run_dir / "round-1/llm/labels.jsonl")
    asked = [r["asked"] for r in after]
    assert any(asked) and annotator.ledger.abstained >= sum(asked)
    assert [r["label"] for r in after] == [r["label"] for r in before]
    assert not any(r["changed"] for r in after)
    assert frame["label"].notna().all()


def test_an_injected_annotator_is_part_of_the_fingerprint(trec, smollm2, tmp_path):
    task, items = trec
    first = CachedAnnotator(smollm2, CallCache(tmp_path / "cache.sqlite"))
    runner = FreeAL(task, slm=SLM, loop=ZERO_SHOT_START, run_dir=tmp_path / "run", annotator=first)
    runner.progress = False
    runner.fit(items)
    other = AbstainsWhenTold(smollm2)  # another model as far as the run can tell
    second = CachedAnnotator(other, CallCache(tmp_path / "cache.sqlite"))
    runner = FreeAL(task, slm=SLM, loop=ZERO_SHOT_START, run_dir=tmp_path / "run", annotator=second)
    with pytest.raises(FreeALError, match=r"differs in: models\.annotator"):
        runner.fit(items)


def test_the_base_url_actually_used_is_fingerprinted(monkeypatch):
    cfg = LLMConfig(backend="openai", model="m")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9001/v1")
    one = annotator_identity(cfg)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9002/v1")
    assert annotator_identity(cfg) != one and "9002" in annotator_identity(cfg)


def test_changed_backbone_weights_change_the_fingerprint(tmp_path):
    from freeal.embed import weights_identity

    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"a" * 10)
    before = weights_identity(folder)
    (folder / "model.safetensors").write_bytes(b"b" * 11)
    assert weights_identity(folder) != before


def test_a_kill_right_after_run_json_leaves_a_folder_that_resumes(trec, smollm2, tmp_path, monkeypatch):
    import freeal.loop as loop_module

    task, items = trec
    real = loop_module.write_jsonl_atomic

    def dies_on_items(path, rows):  # type: ignore[no-untyped-def]
        if path.name == "items.jsonl":
            raise KeyboardInterrupt("killed between the first two writes")
        return real(path, rows)

    annotator = CachedAnnotator(smollm2, CallCache(tmp_path / "cache.sqlite"))
    make = lambda: FreeAL(  # noqa: E731
        task, slm=SLM, loop=ZERO_SHOT_START, run_dir=tmp_path / "run", annotator=annotator, progress=False
    )
    monkeypatch.setattr(loop_module, "write_jsonl_atomic", dies_on_items)
    with pytest.raises(KeyboardInterrupt):
        make().fit(items)
    monkeypatch.setattr(loop_module, "write_jsonl_atomic", real)
    frame = make().fit(items)
    assert len(frame) == len(items)
    assert [r["id"] for r in read_jsonl(tmp_path / "run" / "items.jsonl")] == items.ids


def test_two_processes_cannot_share_a_run_folder(trec, smollm2, tmp_path):
    from filelock import FileLock

    task, items = trec
    (tmp_path / "run").mkdir()
    held = FileLock(tmp_path / "run" / ".lock")
    entered, release = threading.Event(), threading.Event()

    def other_process() -> None:  # flock locks are per open file: a thread stands in for a process
        with held:
            entered.set()
            release.wait(30)

    thread = threading.Thread(target=other_process)
    thread.start()
    entered.wait(10)
    try:
        annotator = CachedAnnotator(smollm2, CallCache(tmp_path / "cache.sqlite"))
        runner = FreeAL(task, slm=SLM, loop=ZERO_SHOT_START, run_dir=tmp_path / "run", annotator=annotator)
        with pytest.raises(FreeALError, match="in use by another freeal process"):
            runner.fit(items)
        assert annotator.ledger.calls == 0
    finally:
        release.set()
        thread.join()


def test_slm_overrides_are_validated():
    with pytest.raises(FreeALError, match="epochs"):
        SLMClassifier(["a", "b"], epochs=-1)
    with pytest.raises(FreeALError, match="mode"):
        SLMClassifier(["a", "b"], mode="bogus")
    assert SLMClassifier(["a", "b"], epochs=3).config.epochs == 3


def test_the_tagger_honours_the_configured_split_unit():
    from freeal.slm.tagger import SLMTagger

    assert SLMTagger(["Chemical"], SLMConfig(split_unit="token")).split_unit == "token"


def test_annotate_and_train_refuse_an_ner_task(data_dir, tmp_path):
    runner = CliRunner()
    data = str(data_dir / "bc5cdr" / "train.jsonl")
    for command in (
        ["annotate", "--task", str(data_dir / "bc5cdr"), "--data", data, "--out", str(tmp_path / "o.jsonl")],
        ["train", "--task", str(data_dir / "bc5cdr"), "--data", data, "--out", str(tmp_path / "slm")],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code != 0
        assert "kind: ner" in str(result.exception) and "freeal run" in str(result.exception)


def test_saved_models_load_with_weights_only(tmp_path, monkeypatch):
    """A saved SLM holds tensors only: loading never unpickles code."""
    calls = []
    real = torch.load

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        calls.append(kw.get("weights_only"))
        return real(*args, **kw)

    texts = ["good", "bad", "great", "awful"] * 4
    model = SLMClassifier(["negative", "positive"], SLMConfig(mode="head", epochs=2, warmup_epochs=0))
    model.fit(texts, ["positive", "negative"] * 8)
    model.save(tmp_path / "m")
    monkeypatch.setattr(torch, "load", spy)
    again = SLMClassifier.load(tmp_path / "m", device="cpu")
    assert calls == [True]
    assert np.allclose(again.predict_proba(texts), model.predict_proba(texts), atol=1e-6)


def test_an_interrupted_model_assembly_leaves_no_partial_file(tmp_path, monkeypatch):
    from freeal.llm import models

    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    chunk = tmp_path / "part01.bin"
    chunk.write_bytes(b"x" * (3 << 22))
    monkeypatch.setattr(models, "_chunks", lambda model: [chunk, chunk])
    real_open = type(chunk).open
    opened = []

    def interrupted(self, mode="r", *a, **kw):  # type: ignore[no-untyped-def]
        if self == chunk:
            opened.append(1)
            if len(opened) == 2:
                raise KeyboardInterrupt("Ctrl-C during assembly")
        return real_open(self, mode, *a, **kw)

    monkeypatch.setattr(type(chunk), "open", interrupted)
    monkeypatch.setitem(
        models.MODELS, "fake", models.EmbeddedModel("fake", "fake.gguf", "fake==1", ("fake",), "0" * 64)
    )
    with pytest.raises(KeyboardInterrupt):
        models.model_path("fake")
    assert not list((tmp_path / "models").glob("*"))


def test_a_corrupt_or_foreign_cache_file_is_one_clear_error(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(FreeALError, match="not a readable freeal LLM cache"):
        CallCache(garbage)
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(FreeALError, match="not a freeal LLM cache"):
        CallCache(foreign)
    assert foreign.stat().st_size > 0  # not overwritten


def test_the_cache_carries_a_schema_version_and_refuses_another(tmp_path):
    path = tmp_path / "c.sqlite"
    CallCache(path).close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("1",)
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(FreeALError, match="schema version 99"):
        CallCache(path)


def test_a_cache_from_before_the_schema_version_still_opens(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute("INSERT INTO answers VALUES ('k', '{}')")
    assert len(CallCache(path)) == 1


def test_the_embedding_cache_temp_file_is_per_process(tmp_path, monkeypatch):
    from freeal.embed import Embedder

    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    written = []
    real_open = np.lib.format.open_memmap

    def spy(path, mode="r+", **kw):  # type: ignore[no-untyped-def]
        if mode == "w+":
            written.append(path)
        return real_open(path, mode=mode, **kw)

    monkeypatch.setattr(np.lib.format, "open_memmap", spy)
    Embedder(device="cpu").encode(["one text", "another"])
    assert len(written) == 1 and f"tmp{__import__('os').getpid()}" in str(written[0])


def test_cached_embeddings_are_written_in_chunks_and_read_back_as_a_memory_map(tmp_path, monkeypatch):
    """A million texts' vectors never sit whole in memory: written chunk by chunk, read mapped."""
    from freeal.embed import Embedder

    texts = [f"text number {i} about a film" for i in range(7)]
    whole = Embedder(device="cpu", cache=False).encode(texts)
    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(Embedder, "CHUNK", 3)
    first = Embedder(device="cpu").encode(texts)
    again = Embedder(device="cpu").encode(texts)
    for vectors in (first, again):
        assert isinstance(vectors, np.memmap) and not vectors.flags.writeable
        assert np.allclose(vectors, whole, atol=1e-5)
    assert not list(tmp_path.rglob("*.tmp*"))  # the temp file was renamed into place


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://llm.invalid/v1", True),
        ("http://192.0.2.10:8000/v1", True),
        ("https://llm.invalid/v1", False),
        ("http://127.0.0.1:8000/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
    ],
)
def test_an_api_key_never_goes_over_plain_http_beyond_this_machine(url, refused, monkeypatch):
    import httpx

    sent: list[str] = []

    def no_network(self, request, **kw):  # type: ignore[no-untyped-def]
        sent.append(str(request.url))  # nothing leaves this machine in this test
        raise httpx.ConnectError("no network in this test", request=request)

    async def no_network_async(self, request, **kw):  # type: ignore[no-untyped-def]
        return no_network(self, request)

    # every way httpx sends, at the transport level: no request can reach any address
    monkeypatch.setattr(httpx.HTTPTransport, "handle_request", no_network)
    monkeypatch.setattr(httpx.AsyncHTTPTransport, "handle_async_request", no_network_async)
    monkeypatch.setenv("TEST_KEY", "sk-secret")
    prompts = [[{"role": "user", "content": "hi"}]]

    def ask(**kw: object) -> str:
        annotator = OpenAICompatAnnotator("m", base_url=url, api_key_env="TEST_KEY", max_retries=0, **kw)
        try:
            list(annotator.score_many(prompts, ["a", "b"]))
        except FreeALError as exc:
            return str(exc)
        return ""

    if refused:
        message = ask()
        assert "refusing to send the API key" in message and "sk-secret" not in message
        assert sent == []
        assert "refusing" not in ask(allow_plain_http=True) and sent  # the user opted in
    else:
        assert "refusing" not in ask() and sent


SHARED_CACHE_CHILD = """
import json, sys
from freeal.data import read_items
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.llamacpp import LlamaCppAnnotator
from freeal.llm.models import resolve_model
from freeal.llm.prompts import classification_prompt
from freeal.tasks import Task, load_task
task = load_task(sys.argv[1])
items = read_items(sys.argv[2], task=task, limit=24, seed=4)
path, name = resolve_model("smollm2-135m")
llm = LlamaCppAnnotator(path, name=name, n_ctx=512, n_threads=1)
annotator = CachedAnnotator(llm, CallCache(sys.argv[3]))
prompts = [classification_prompt(task, t) for t in items.texts]
answers = dict(annotator.score_many(prompts, task.label_names))
print(json.dumps({"calls": annotator.ledger.calls, "answers": len(answers)}))
"""


OPEN_CACHE_CHILD = """
import sys, time
from freeal.llm.base import Generation
from freeal.llm.cache import CallCache
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all children open the file together
cache = CallCache(sys.argv[1])
cache.put(sys.argv[3], Generation(text=sys.argv[3], prompt_tokens=1, completion_tokens=1))
print(len(cache))
"""


def test_many_processes_opening_one_new_cache_at_once_all_succeed(tmp_path):
    import subprocess
    import sys
    import time

    path, start = tmp_path / "fresh.sqlite", time.time() + 3
    children = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_CACHE_CHILD, str(path), str(start), f"k{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    results = [child.communicate(timeout=120) for child in children]
    assert [child.returncode for child in children] == [0] * 8, [err for _, err in results]
    from freeal.llm.cache import CallCache

    assert len(CallCache(path)) == 8


def test_two_processes_on_one_cache_never_pay_for_the_same_call(data_dir, tmp_path):
    import json
    import subprocess
    import sys

    args = [str(data_dir / "sst2"), str(data_dir / "sst2" / "test.jsonl"), str(tmp_path / "shared.sqlite")]
    both = [
        subprocess.Popen([sys.executable, "-c", SHARED_CACHE_CHILD, *args], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    found = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in both]
    assert [f["answers"] for f in found] == [24, 24]
    assert sum(f["calls"] for f in found) == 24  # one process asked; the other found its answers


def test_endpoints_come_from_a_run_config(data_dir, tmp_path):
    from freeal.cli import load_run_config

    config = tmp_path / "run.yaml"
    config.write_text(
        f"""
task: {data_dir / "sst2"}
data: {{path: {data_dir / "sst2" / "test.jsonl"}}}
out: out
llm:
  backend: openai
  model: served-model
  endpoints:
    - {{base_url: "http://127.0.0.1:8001/v1"}}
    - {{base_url: "http://127.0.0.1:8002/v1", api_key_env: KEY_2}}
"""
    )
    cfg = load_run_config(config)
    assert [e.api_key_env for e in cfg.llm.endpoints] == ["OPENAI_API_KEY", "KEY_2"]
    identity = annotator_identity(cfg.llm)
    assert "127.0.0.1:8001" in identity and "127.0.0.1:8002" in identity
    config.write_text(config.read_text().replace("{base_url:", "{url:", 1))
    with pytest.raises(FreeALError, match="endpoints"):
        load_run_config(config)


def test_an_endpoint_may_carry_its_own_limits():
    """`max_concurrency`, `rpm` and `tpm` on one endpoint (the issue's config) validate, reach the
    annotator, and change neither the cache key nor the run's fingerprint (limits change no
    answer); a bad limit is one error naming it."""
    url = "http://127.0.0.1:8001/v1"
    limited = {"base_url": url, "rpm": 60, "tpm": 1000, "max_concurrency": 2}
    cfg = validate(LLMConfig, {"backend": "openai", "model": "m", "endpoints": [limited]}, "run.yaml")
    plain = validate(
        LLMConfig, {"backend": "openai", "model": "m", "endpoints": [{"base_url": url}]}, "run.yaml"
    )
    (endpoint,) = cfg.endpoints
    assert endpoint.max_concurrency == 2
    assert endpoint.requests_per_minute == 60 and endpoint.tokens_per_minute == 1000
    assert annotator_identity(cfg) == annotator_identity(plain)
    task = Task(name="t", description="Sentiment.", labels={"negative": "bad", "positive": "good"})
    items = read_items(pd.DataFrame({"text": ["a film"]}), label_col=None)
    specs = [
        fingerprint(task, items, items.texts, c, SLMConfig(), LoopConfig(), models={}) for c in (cfg, plain)
    ]
    assert specs[0] == specs[1]  # limits change no answer: a run resumes whatever they are
    bad = {"backend": "openai", "model": "m", "endpoints": [{"base_url": url, "max_concurrency": 0}]}
    with pytest.raises(
        FreeALError, match=r"^run\.yaml: endpoints\.0\.max_concurrency: .*greater than or equal to 1"
    ):
        validate(LLMConfig, bad, "run.yaml")


def test_vectors_stored_from_elsewhere_are_what_encode_returns(tmp_path, monkeypatch):
    """Vectors computed elsewhere, stored in chunks, are served from the cache without encoding;
    a count that does not match the texts is refused and leaves no file."""
    from freeal.embed import Embedder

    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    texts = [f"text {i}" for i in range(5)]
    given = np.eye(5, 8, dtype=np.float32)
    embedder = Embedder(device="cpu")
    embedder.store(texts, (given[i : i + 2] for i in range(0, 5, 2)))
    monkeypatch.setattr(Embedder, "_model_encode", lambda self, t: pytest.fail("encoded again"))
    assert np.array_equal(embedder.encode(texts), given)
    with pytest.raises(FreeALError, match="4 vectors given for 5 texts"):
        embedder.store([f"other {i}" for i in range(5)], [given[:4]])
    assert len(list(tmp_path.rglob("*.npy"))) == 1

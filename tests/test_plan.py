"""The plan before a run: its numbers recover the rates of a backend whose costs are known."""

from __future__ import annotations

import pytest

from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.data import read_items
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.llm.prompts import classification_prompt
from freeal.tasks import load_task


def seconds(prompt) -> float:  # type: ignore[no-untyped-def]
    """The fake machine: 20 ms a call plus 0.2 ms a character of the prompt's last message."""
    return 0.02 + 0.0002 * len(prompt[-1]["content"])


def test_plan_recovers_a_known_backend_and_writes_nothing(data_dir, tmp_path, monkeypatch, scripted_llm):
    pytest.importorskip("torch")
    from freeal.plan import plan_run

    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path / "cache"))
    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "train.jsonl", task=task, limit=150, seed=3)
    user_cache = CallCache(tmp_path / "user.sqlite")
    annotator = CachedAnnotator(scripted_llm(lambda text, labels: labels[len(text) % 2], seconds), user_cache)
    llm = LLMConfig(calibrate="off")
    slm = SLMConfig(backbone="all-minilm-l6-v2", epochs=2, warmup_epochs=1, cross_fit=0, device="cpu")
    loop = LoopConfig(refinery_rounds=2)
    plan = plan_run(task, items, llm, slm, loop, annotator=annotator, price_per_million=(2.0, 8.0))

    stages = {s["name"]: s for s in plan["stages"]}
    first = stages["round 0 (every item)"]
    expected = sum(seconds(classification_prompt(task, text, ())) for text in items.texts)
    assert first["calls"] == len(items)
    assert first["seconds"] == pytest.approx(expected, rel=0.15)
    sent = sum(sum(len(m["content"]) for m in classification_prompt(task, t, ())) // 4 for t in items.texts)
    assert first["sent_tokens"] == pytest.approx(sent, rel=0.05)
    refine = stages["round 1 refinery"]
    assert refine["calls"] == round(0.25 * len(items))  # the assumed share, said in the plan
    assert plan["assumed_noisy_share"] == 0.25
    assert refine["sent_tokens"] > refine["calls"] * first["sent_tokens"] / first["calls"]  # demonstrations
    assert stages["round 0 SLM"]["seconds"] > 0 and stages["embed texts"]["seconds"] > 0
    # a second round runs only if the first changed enough labels: planned, with the condition said
    later = stages["round 2 refinery (if round 1 changes 2.5% of the labels or more)"]
    assert later["calls"] == refine["calls"]
    # one more SLM training, on the final labels, timed on its own: the classifier's deployed SLM is
    # linear on layer means and embeds the texts its own way, where a later round's head reuses its
    # cached vectors
    assert stages["SLM on the final labels"]["seconds"] > stages["round 1 SLM"]["seconds"]
    total = plan["total"]
    assert total["seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]))
    low, high = plan["seconds_range"]
    assert low < total["seconds"] < high
    assert plan["cost"] == pytest.approx((total["sent_tokens"] * 2 + total["completion_tokens"] * 8) / 1e6)
    assert len(user_cache) == 0 and annotator.ledger.calls == 0  # probes never touch the user's cache
    assert plan["probe_calls"] == 2 * 12 and plan["disk_mb"] > 0

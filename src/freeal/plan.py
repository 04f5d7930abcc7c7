"""A plan before the run: LLM calls, tokens, time and disk per stage, from a few timing probes.

Why probes and not a formula: a stage's time depends on the machine (prefill rate, threads), on
the backend (an embedded model reuses a group's shared prefix, a server does not say), and on the
prompts the task kind builds. So the plan asks the real stages about a small random sample:

* one LLM pass over ``probe`` items alone (the zero-shot prompt), and one with ``k`` of their
  answers as demonstrations (a refinery group), through a cache of its own, so every probe call is
  timed and none is answered from the user's cache; each call's seconds and tokens are split into a
  per-group part (instructions, demonstrations, calibration inputs) and a per-item part that grows
  with the item's length (a least-squares line over the probe's items);
* the SLM step on ``slm_probe`` items (made-up answers: only its time is wanted) twice: the first
  also embeds them, the second only trains, as the run's later rounds do;
* the loop's own embedding of the sample.

Everything is then scaled to the whole data set: per-item parts by the texts' lengths, per-group
parts by the number of groups the run will form. What no probe can know is how many items refinery
will ask: that is an assumption (:data:`NOISY_SHARE`, with the range measured in BENCHMARKS.md),
stated in the plan beside the numbers it drives.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from freeal.config import LLMConfig, LoopConfig, SLMConfig
from freeal.embed import Embedder
from freeal.kinds import kind_of
from freeal.llm.base import Generation, LabelScores, Message
from freeal.llm.cache import CachedAnnotator, CallCache
from freeal.tasks import Task

#: Share of the items refinery asks per round, assumed: 11-35% were measured (BENCHMARKS.md).
NOISY_SHARE = 0.25
NOISY_RANGE = (0.11, 0.35)


@dataclass
class Stage:
    """One stage of the run as planned: LLM calls, tokens sent and evaluated, seconds."""

    name: str
    calls: int = 0
    sent_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class _Call:
    """One timed probe call: the item it asked about (``None``: a calibration input), its tokens and
    the seconds from the previous answer to this one."""

    item: int | None
    sent: int
    evaluated: int
    completion: int
    seconds: float


class _Timed:
    """Wraps a backend so that each answer is timed as it arrives (the backend answers one after
    another, so the gap between two answers is one call's work)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.identity = f"plan-probe:{inner.identity}"
        self.supports_grammar = bool(getattr(inner, "supports_grammar", False))
        self.log: list[tuple[list[Message], LabelScores | Generation, float]] = []

    def _timed(self, prompts: Sequence[list[Message]], stream: Iterator[tuple[int, Any]]) -> Iterator:
        last = time.perf_counter()
        for j, answer in stream:
            now = time.perf_counter()
            self.log.append((prompts[j], answer, now - last))
            last = now
            yield j, answer

    def score_many(self, prompts: Sequence[list[Message]], labels: Sequence[str]) -> Iterator:
        return self._timed(prompts, self.inner.score_many(prompts, labels))

    def generate_many(self, prompts: Sequence[list[Message]], **kwargs: Any) -> Iterator:
        return self._timed(prompts, self.inner.generate_many(prompts, **kwargs))


@dataclass
class _PassModel:
    """A pass's cost as ``per group`` + per item ``a + b * characters`` (seconds and tokens)."""

    group: dict[str, float]
    item: dict[str, tuple[float, float]]

    def stage(self, name: str, groups: int, lengths: np.ndarray) -> Stage:
        def total(key: str) -> float:
            a, b = self.item[key]
            return groups * self.group[key] + len(lengths) * a + b * float(lengths.sum())

        return Stage(
            name,
            calls=round(total("calls")),
            sent_tokens=round(total("sent")),
            evaluated_tokens=round(total("evaluated")),
            completion_tokens=round(total("completion")),
            seconds=total("seconds"),
        )


def _fit_pass(calls: list[_Call], lengths: dict[int, int]) -> _PassModel:
    """Split one probe group's calls into the per-item line and what is left for the group.

    The first item call also evaluated the group's shared prefix (when no calibration input came
    before it), so it is left out of the line and its excess counted for the group."""
    keys = ("seconds", "sent", "evaluated", "completion")
    item_calls = [c for c in calls if c.item is not None]
    fitted = item_calls[1:] if len(item_calls) > 2 else item_calls
    x = np.asarray([lengths[c.item] for c in fitted], dtype=np.float64)  # type: ignore[index]
    item: dict[str, tuple[float, float]] = {"calls": (1.0, 0.0)}
    for key in keys:
        y = np.asarray([getattr(c, key) for c in fitted], dtype=np.float64)
        if len(x) > 1 and np.ptp(x) > 0:
            b, a = np.polyfit(x, y, 1)
            b = max(float(b), 0.0)
            a = float(np.mean(y) - b * np.mean(x))
        else:
            a, b = float(np.mean(y)) if len(y) else 0.0, 0.0
        item[key] = (a, b)
    group = {"calls": float(len(calls) - len(item_calls))}
    for key in keys:
        a, b = item[key]
        spent = sum(getattr(c, key) for c in calls)
        group[key] = max(spent - sum(a + b * lengths[c.item] for c in item_calls), 0.0)  # type: ignore[index]
    return _PassModel(group, item)


#: Characters a prompt may hold after the text it asks about (``"\nLabel:"``).
_TAIL = 16


def _ends_with(message: str, text: str) -> bool:
    """Whether ``text`` ends ``message`` but for a short tail (the asked text, not a demonstration)."""
    at = message.rfind(text)
    return at >= 0 and len(message) - (at + len(text)) <= _TAIL


def _probe_pass(
    kind: Any, timed: _Timed, annotator: CachedAnnotator, items: Any, demos: list[dict], calibrate: Any
) -> tuple[list[_Call], Any]:
    """Ask ``items`` as one group with ``demos``; the timed calls, matched to items by their text."""
    start = len(timed.log)
    answers = kind.ask(
        annotator,
        items,
        [(np.arange(len(items)), demos)],
        calibrate=calibrate,
        progress=False,
        description="plan probe",
    )
    texts = kind.texts(items)
    calls = []
    for prompt, answer, seconds in timed.log[start:]:
        # the text asked about ends the last message (demonstrations come before it, and a
        # calibration input is no item): the item is the longest text ending within its last chars
        asked = str(prompt[-1].get("content") or "")
        found = [i for i, text in enumerate(texts) if _ends_with(asked, text)]
        calls.append(
            _Call(
                item=max(found, key=lambda i: len(texts[i])) if found else None,
                sent=answer.prompt_tokens,
                evaluated=answer.evaluated_tokens,
                completion=answer.completion_tokens,
                seconds=seconds,
            )
        )
    return calls, answers


def plan_run(
    task: Task,
    items: Any,
    llm: LLMConfig,
    slm: SLMConfig,
    loop: LoopConfig,
    *,
    annotator: CachedAnnotator,
    probe: int = 12,
    slm_probe: int = 48,
    noisy_share: float = NOISY_SHARE,
    price_per_million: tuple[float, float] | None = None,
) -> dict:
    """The plan of a run of ``loop`` over ``items`` (see the module docstring); nothing is written
    to the user's cache or run folder. ``price_per_million``: (input, output) price per 1M tokens,
    for a served model; the cost then counts every token sent, as providers bill them."""
    kind = kind_of(task)
    loop = kind.with_defaults(loop)
    deployed = kind.deployed_settings(slm, loop)
    slm = kind.with_backbone(slm)
    # with final_label llm the final labels are the last round's answers: no training is needed
    retrained = loop.deployed_slm == "final_labels" and loop.final_label == "combined"
    texts = kind.texts(items)
    n = len(texts)
    lengths_all = np.asarray([len(t) for t in texts], dtype=np.float64)
    rng = np.random.default_rng(loop.seed)
    sample = items.subset(sorted(int(i) for i in rng.choice(n, size=min(probe, n), replace=False)))
    sample_lengths = dict(enumerate(len(t) for t in kind.texts(sample)))

    timed = _Timed(annotator.inner)
    scratch = Path(tempfile.mkdtemp(prefix="freeal-plan-"))
    try:
        probing = CachedAnnotator(timed, CallCache(scratch / "probe.sqlite"))
        zs_calls, zs = _probe_pass(kind, timed, probing, sample, [], llm.calibrate)
        shown = [i for i, v in enumerate(zs.values) if v is not None][: loop.k]
        demos = [kind.demonstration(sample, i, zs.values[i]) for i in shown]
        ref_calls, _ = _probe_pass(kind, timed, probing, sample, demos, llm.calibrate)
        probing.cache.close()
        first = _fit_pass(zs_calls, sample_lengths)
        refine = _fit_pass(ref_calls, sample_lengths)
        # a fresh draw: a sample embedded before is on disk and would time as free
        fresh = np.random.default_rng()
        first_train, later_train, model_mb = _probe_slm(
            kind, items, slm, slm_probe, fresh, scratch, lengths_all
        )
        # the SLM handed back, in settings of its own (another mode, encoder): its first step, which
        # embeds the texts its own way
        deployed_train = (
            later_train
            if deployed == slm or not retrained
            else _probe_slm(kind, items, deployed, slm_probe, fresh, scratch, lengths_all)[0]
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    embed_seconds = _probe_embedding(slm.device, texts, rng, slm_probe)

    def groups(asked: int) -> int:  # groups sharing demonstrations, or one an item (group_size null)
        return math.ceil(asked / loop.group_size) if loop.group_size else asked

    stages = [Stage("embed texts", seconds=embed_seconds)]
    if loop.initial_demos == "generated":  # the paper: written demonstrations, then each text with its own
        if loop.zero_shot_baseline:
            stages.append(first.stage("zero-shot baseline", 1, lengths_all))
        stages.append(Stage("write demonstrations (not planned: measured in the run)"))
        stages.append(refine.stage("round 0 (every item, with demonstrations)", groups(n), lengths_all))
    else:
        stages.append(first.stage("round 0 (every item)", 1, lengths_all))
    stages.append(Stage("round 0 SLM", seconds=first_train))
    asked = max(1, round(noisy_share * n))
    mean_length = float(lengths_all.mean())
    for r in range(1, loop.refinery_rounds + 1):
        # a later round runs only if the one before changed at least ``min_change`` of the labels,
        # which no probe can tell: planned, and said to be an upper bound
        when = f" (if round {r - 1} changes {loop.min_change:.1%} of the labels or more)" if r > 1 else ""
        stages.append(refine.stage(f"round {r} refinery{when}", groups(asked), np.full(asked, mean_length)))
        stages.append(Stage(f"round {r} SLM{when}", seconds=later_train))
    if retrained:
        stages.append(Stage("SLM on the final labels", seconds=deployed_train))
    plan: dict = {
        "items": n,
        "unit": kind.unit,
        "model": annotator.identity,
        "assumed_noisy_share": noisy_share,
        "noisy_share_range": list(NOISY_RANGE),
        "probe_calls": len(timed.log),
        "stages": [asdict(s) for s in stages],
        "total": asdict(_sum(stages)),
        "disk_mb": _disk_mb(texts, loop.refinery_rounds + retrained, kind.unit, model_mb),
    }
    low = _sum([s for s in stages if "refinery" not in s.name])
    refinery_seconds = plan["total"]["seconds"] - low.seconds
    plan["seconds_range"] = [low.seconds + refinery_seconds * share / noisy_share for share in NOISY_RANGE]
    if price_per_million is not None:
        total = plan["total"]
        plan["cost"] = (
            total["sent_tokens"] * price_per_million[0] + total["completion_tokens"] * price_per_million[1]
        ) / 1e6
    return plan


def _sum(stages: Sequence[Stage]) -> Stage:
    out = Stage("total")
    for s in stages:
        out.calls += s.calls
        out.sent_tokens += s.sent_tokens
        out.evaluated_tokens += s.evaluated_tokens
        out.completion_tokens += s.completion_tokens
        out.seconds += s.seconds
    return out


def _probe_slm(
    kind: Any,
    items: Any,
    slm: SLMConfig,
    size: int,
    rng: np.random.Generator,
    scratch: Path,
    lengths_all: np.ndarray,
) -> tuple[float, float, float]:
    """Seconds of the first SLM step and of a later one, and the saved model's size in MB.

    A step loads its backbone (timed on a few items: ``load``), then embeds and trains in
    proportion to the texts' length: the first call on ``size`` items is scaled to all items. A
    later step may skip the load and the embedding (a head on embeddings found on disk) or not (a
    fine-tuned tagger loads and encodes every time): its second call on the same items tells which,
    and the cheaper reading of it is taken."""
    n = len(kind.texts(items))
    picked = sorted(int(i) for i in rng.choice(n, size=min(size, n), replace=False))
    sample = items.subset(picked)
    answers = _probe_answers(kind, len(picked))
    warm = list(range(min(len(picked), 2 * len(kind.task.label_names))))  # every class once or twice
    start = time.perf_counter()
    kind.train(sample.subset(warm), [answers[i] for i in warm], slm, lambda entry: None)
    load = time.perf_counter() - start
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fit = kind.train(sample, answers, slm, lambda entry: None)
        times.append(time.perf_counter() - start)
    fit.model.save(scratch / "model")
    model_mb = sum(f.stat().st_size for f in (scratch / "model").rglob("*") if f.is_file()) / 1e6
    scale = float(lengths_all.sum()) / max(float(lengths_all[picked].sum()), 1.0)
    first = load + max(times[0] - load, 0.0) * scale
    later = min(load + max(times[1] - load, 0.0) * scale, times[1] * scale)
    return first, later, model_mb


def _probe_answers(kind: Any, n: int) -> list[Any]:
    """Answers of the kind's shape for a timing probe: the labels in turn, or no entities."""
    if kind.answer_key == "label":
        names = kind.task.label_names
        return [names[i % len(names)] for i in range(n)]
    return [[] for _ in range(n)]


def _probe_embedding(device: str, texts: Sequence[str], rng: np.random.Generator, size: int) -> float:
    """Seconds to embed every text (the loop's own vectors): loading the encoder, then ``size``
    texts scaled by length (no disk cache, so texts seen before are timed too)."""
    start = time.perf_counter()
    embedder = Embedder(device=device, cache=False)
    embedder.encode(list(texts[:2]))
    load = time.perf_counter() - start
    picked = rng.choice(len(texts), size=min(size, len(texts)), replace=False)
    start = time.perf_counter()
    embedder.encode([texts[int(i)] for i in picked])
    spent = time.perf_counter() - start
    lengths = np.asarray([len(t) for t in texts], dtype=np.float64)
    return load + spent * float(lengths.sum()) / max(float(lengths[picked].sum()), 1.0)


def _disk_mb(texts: Sequence[str], rounds: int, unit: str, model_mb: float) -> float:
    """The run folder's size, roughly: a saved SLM per round, and step files holding a row per item
    of about its text plus the step's fields (~300 bytes a text, ~1 kB a sentence with its tags),
    about four files per round."""
    per_row = 1000 if unit == "sentences" else 300
    rows = sum(len(t.encode()) + per_row for t in texts)
    return (rows * (2 + 4 * (rounds + 1))) / 1e6 + model_mb * (rounds + 1)

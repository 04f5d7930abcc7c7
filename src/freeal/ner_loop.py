"""The FreeAL loop for named-entity recognition, on the classification loop's structure.

Same steps, run folder, resume, cache and report as :class:`freeal.loop.FreeAL` (this class only
replaces what a step does with a sentence instead of a text):

1. **Initial round.** The LLM writes sentences with their entities for each type
   (:func:`freeal.ner_annotate.generate_ner_demonstrations`); with ``verify_demos`` it also
   annotates each written sentence zero-shot and the two entity lists are merged, since a writer
   asked for one type tends to list only that type. Every sentence is then annotated with its
   nearest written demonstrations.
2. **Robust self-training** of the token tagger (:class:`freeal.slm.tagger.SLMTagger`).
3. **Feedback.** Clean sentences are those where the tagger reproduces the LLM's tags, ranked by
   mean token loss; the pool is k-medoids per *signature* (which entity types a sentence holds,
   e.g. ``Chemical+Disease`` or ``none``), so demonstrations show every type and empty sentences.
4. **Refinery.** Noisy (and unanswered) sentences are annotated again with their nearest pool
   sentences; the new entity list replaces the old one (an LLM entity list carries no
   probabilities to combine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freeal.data import Sentences, read_jsonl, read_sentences, write_jsonl_atomic
from freeal.demos import feedback
from freeal.errors import FreeALError
from freeal.loop import FreeAL
from freeal.metrics import ner_report
from freeal.ner import Span, render, spans_from_tags, tags_from_spans
from freeal.ner_annotate import Demo, annotate_sentences, generate_ner_demonstrations
from freeal.slm.tagger import SLMTagger


def signature(spans: Sequence[Span] | None) -> str | None:
    """Which entity types a sentence holds (``none`` for none): the "class" of a sentence when the
    clean set and the demonstration pool are balanced."""
    if spans is None:
        return None
    kinds = sorted({k for k, _, _ in spans})
    return "+".join(kinds) if kinds else "none"


def _spans(raw: Any) -> list[Span] | None:
    return None if raw is None else [(k, int(s), int(e)) for k, s, e in raw]


def merge_spans(first: Sequence[Span], second: Sequence[Span]) -> list[Span]:
    """``first`` plus the spans of ``second`` that overlap none of them."""
    taken = {k for _, s, e in first for k in range(s, e)}
    extra = [sp for sp in second if not any(k in taken for k in range(sp[1], sp[2]))]
    return sorted([*first, *extra], key=lambda sp: sp[1])


class FreeALNER(FreeAL):
    """The loop on a ``kind: ner`` task. Made by ``FreeAL(task, ...)`` when the task is NER.

    :meth:`fit` takes :class:`~freeal.data.Sentences`, a list of token lists or a list of raw
    strings (tokenized by :func:`freeal.ner.tokenize`); gold tags (``Sentences.gold``) and a test
    :class:`~freeal.data.Sentences` only score the rounds.
    """

    def fit(  # type: ignore[override]
        self, texts: Any, gold: Sequence[Sequence[str] | None] | None = None, *, test: Sentences | None = None
    ) -> pd.DataFrame:
        """Run (or resume) the loop; returns one row per sentence: ``id, tokens, tags, entities,
        clean, round_changed, slm_tags, slm_confidence, agreement``."""
        sentences = texts if isinstance(texts, Sentences) else read_sentences(texts, task=self.task)
        if gold is not None:
            sentences = Sentences(sentences.ids, sentences.tokens, [list(g) for g in gold], sentences.source)
        return super().fit(sentences, test=test)

    def _as_input(self, texts: Any, gold: Any) -> Sentences:
        return texts

    def _item_rows(self) -> list[dict]:
        return [{"id": i, "tokens": t} for i, t in zip(self.items.ids, self.items.tokens, strict=True)]

    def _score(self, tags: Sequence[Sequence[str] | None]) -> dict | None:  # type: ignore[override]
        return None if self.gold is None else ner_report(self.gold, tags)

    def _tags(self, spans: Sequence[list[Span] | None]) -> list[list[str] | None]:
        return [
            None if s is None else tags_from_spans(len(t), s)
            for s, t in zip(spans, self.items.tokens, strict=True)
        ]

    # -- LLM steps --------------------------------------------------------------------------------
    def _read_spans(self, name: str) -> pd.DataFrame:
        frame = pd.DataFrame(read_jsonl(self._path(name) / "labels.jsonl"))
        frame["spans"] = [_spans(s) for s in frame["spans"]]
        return frame

    def _write_spans(
        self, name: str, frame: pd.DataFrame, groups: list[tuple[np.ndarray, list[Demo]]]
    ) -> None:
        write_jsonl_atomic(
            self._path(name) / "labels.jsonl",
            [
                {
                    "id": i,
                    "spans": s,
                    "asked": bool(a),
                    "changed": bool(c),
                    "round_changed": rc,
                }
                for i, s, a, c, rc in zip(
                    self.items.ids,
                    frame["spans"],
                    frame["asked"],
                    frame["changed"],
                    frame["round_changed"],
                    strict=True,
                )
            ],
        )
        write_jsonl_atomic(
            self._path(name) / "groups.jsonl",
            [
                {
                    "items": [self.items.ids[i] for i in members],
                    "demonstrations": [{"tokens": t, "spans": s} for t, s in demos],
                }
                for members, demos in groups
            ],
        )

    def _annotate(self, groups: list, description: str) -> Any:
        return annotate_sentences(
            self.task,
            self.items.tokens,
            self.annotator,
            groups,
            progress=self.progress,
            description=description,
        )

    def _zero_shot(self) -> dict:
        groups: list = [(np.arange(len(self.items)), [])]
        answers = self._annotate(groups, "zero-shot")
        frame = pd.DataFrame({"spans": answers.spans, "asked": True, "changed": False, "round_changed": None})
        self._write_spans("zero-shot", frame, groups)
        return {"asked": len(frame), **answers.stats(), "metrics": self._score(self._tags(answers.spans))}

    def _write_demos(self) -> dict:
        cfg = self.loop
        demos, report = generate_ner_demonstrations(
            self.task,
            self.annotator,
            self.items.tokens,
            per_type=cfg.demos_per_label,
            per_call=cfg.demos_per_call,
            style_examples=cfg.style_examples,
            temperature=cfg.generation_temperature,
            max_calls_per_type=cfg.max_calls_per_label,
            seed=cfg.seed,
        )
        self.say(
            f"wrote {report.kept} demonstration sentences ({report.per_type}) in {report.calls} LLM calls"
        )
        result = asdict(report)
        if cfg.verify_demos:
            tokens = [t for t, _ in demos]
            check = annotate_sentences(
                self.task,
                tokens,
                self.annotator,
                [(np.arange(len(demos)), [])],
                progress=self.progress,
                description="demonstrations, zero-shot",
            )
            added = 0
            merged = []
            for (toks, written), found in zip(demos, check.spans, strict=True):
                both = merge_spans(written, found or [])
                added += len(both) - len(written)
                merged.append((toks, both))
            demos = merged
            result["verified"] = len(demos)
            result["spans_added_by_zero_shot"] = added
            self.say(f"the zero-shot pass added {added} entities the writer had not listed")
        write_jsonl_atomic(self._path("demos") / "demos.jsonl", [{"tokens": t, "spans": s} for t, s in demos])
        return result

    def _ner_groups(self, ask: np.ndarray, demos: list[Demo]) -> list[tuple[np.ndarray, list[Demo]]]:
        vectors = self.embedder.encode([render(t) for t, _ in demos])
        labels = [signature(s) or "none" for _, s in demos]
        return [(members, list(picked)) for members, picked in self._groups(ask, demos, vectors, labels)]

    def _initial_round(self) -> dict:
        if self.loop.initial_demos == "generated":
            demos = [
                (r["tokens"], _spans(r["spans"])) for r in read_jsonl(self._path("demos") / "demos.jsonl")
            ]
            groups = self._ner_groups(np.arange(len(self.items)), demos)  # type: ignore[arg-type]
        else:
            groups = [(np.arange(len(self.items)), [])]
        answers = self._annotate(groups, "round 0")
        frame = pd.DataFrame({"spans": answers.spans, "asked": True, "changed": False, "round_changed": 0})
        self._write_spans("round-0/llm", frame, groups)
        return {
            "round": 0,
            "asked": len(frame),
            "groups": len(groups),
            "changed_share": 1.0,
            **answers.stats(),
            "metrics": self._score(self._tags(answers.spans)),
        }

    def _refine(self, r: int) -> dict:
        previous = self._read_spans(f"round-{r - 1}/llm")
        slm = pd.DataFrame(read_jsonl(self._path(f"round-{r - 1}/slm") / "predictions.jsonl"))
        pool = read_jsonl(self._path(f"round-{r - 1}/slm") / "pool.jsonl")
        pool_idx = np.asarray([p["index"] for p in pool], dtype=np.int64)
        old = previous["spans"].tolist()
        noisy = ~slm["clean"].to_numpy(bool) | np.asarray([s is None for s in old])
        noisy[pool_idx] = False
        demos = [(self.items.tokens[i], old[i]) for i in pool_idx]
        if not any(spans for _, spans in demos):
            # A pool of entity-free sentences teaches the LLM to answer "END": measured, it wiped out
            # nearly every entity (split_unit: token, BENCHMARKS.md). Keep the labels instead.
            self.say(f"round {r}: no clean sentence with an entity to show; labels kept as they are")
            noisy[:] = False
        ask = np.flatnonzero(noisy)
        groups = self._ner_groups(ask, demos) if len(ask) and demos else [(ask, [])] if len(ask) else []
        answers = self._annotate(groups, f"round {r}")
        asked = np.zeros(len(self.items), dtype=bool)
        asked[ask] = True
        spans = [
            answers.spans[i] if asked[i] and answers.spans[i] is not None else old[i] for i in range(len(old))
        ]
        changed = [bool(asked[i] and spans[i] != old[i]) for i in range(len(old))]
        round_changed = [r if c else rc for c, rc in zip(changed, previous["round_changed"], strict=True)]
        frame = pd.DataFrame(
            {"spans": spans, "asked": asked, "changed": changed, "round_changed": round_changed}
        )
        self._write_spans(f"round-{r}/llm", frame, groups)
        result = {
            "round": r,
            "asked": int(asked.sum()),
            "groups": len(groups),
            "changed": int(sum(changed)),
            "changed_share": float(np.mean(changed)),
            **answers.stats(),
            "metrics": self._score(self._tags(spans)),
        }
        if self.gold is not None:
            right = [set(spans_from_tags(g)) for g in self.gold]  # type: ignore[arg-type]
            before = [old[i] is not None and set(old[i]) == right[i] for i in range(len(old))]
            after = [spans[i] is not None and set(spans[i]) == right[i] for i in range(len(old))]
            result["fixed"] = int(sum(a and not b for a, b in zip(after, before, strict=True)))
            result["broken"] = int(sum(b and not a for a, b in zip(after, before, strict=True)))
        return result

    # -- SLM step ---------------------------------------------------------------------------------
    def _train(self, r: int) -> dict:
        spans = self._read_spans(f"round-{r}/llm")["spans"].tolist()
        tags = self._tags(spans)

        def show(entry: dict) -> None:
            self.say(
                f"  tagger epoch {entry['epoch']}/{self.slm.epochs}: loss {entry['loss']:.4f}, "
                f"clean {entry['clean_fraction']:.3f}, {entry['seconds']:.1f} s"
            )

        model = SLMTagger(self.task.label_names, self.slm).fit(self.items.tokens, tags, on_epoch=show)
        folder = self._path(f"round-{r}/slm")
        model.save(folder / "model")
        given = [signature(s) for s in spans]
        agree = [t is not None and p == t for p, t in zip(model.train_tags_, tags, strict=True)]
        fb = feedback(
            given,
            [g if a else "<disagree>" for g, a in zip(given, agree, strict=True)],  # type: ignore[misc]
            np.nan_to_num(model.mean_loss_, nan=np.inf),
            self.vectors,
            fraction=self.loop.clean_fraction,
            pool_size=self.loop.pool_size,
            seed=self.loop.seed,
        )
        result = self._write_slm_step(r, model, model.train_tags_, model.train_confidence_, fb)
        if self.gold is not None:
            result["transductive"] = ner_report(self.gold, model.train_tags_)
            exact = np.asarray([t is not None and t == g for t, g in zip(tags, self.gold, strict=True)])
            for name, mask in (("clean", model.clean_mask_), ("noisy", ~model.clean_mask_)):
                result[f"{name}_precision"] = float(exact[mask].mean()) if mask.any() else None
            chosen = np.zeros(len(tags), dtype=bool)
            chosen[fb.clean] = True
            result["clean_set_precision"] = float(exact[chosen].mean()) if chosen.any() else None
        if self.test is not None and self.test.gold is not None:
            result["inductive"] = ner_report(self.test.gold, model.predict(self.test.tokens))
        return result

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, last: int) -> pd.DataFrame:
        from freeal.report import collect

        spans = self._read_spans(f"round-{last}/llm")
        slm = pd.DataFrame(read_jsonl(self._path(f"round-{last}/slm") / "predictions.jsonl"))
        tags = self._tags(spans["spans"].tolist())
        frame = pd.DataFrame(
            {
                "id": self.items.ids,
                "tokens": self.items.tokens,
                "tags": tags,
                "entities": [
                    None
                    if s is None
                    else [{"type": k, "start": a, "end": b, "text": render(t[a:b])} for k, a, b in s]
                    for s, t in zip(spans["spans"], self.items.tokens, strict=True)
                ],
                "clean": slm["clean"].astype(bool),
                "round_changed": spans["round_changed"],
                "slm_tags": slm["predicted"],
                "slm_confidence": slm["confidence"],
                "agreement": [
                    None if t is None else float(np.mean([a == b for a, b in zip(t, p, strict=True)]))
                    for t, p in zip(tags, slm["predicted"], strict=True)
                ],
            }
        )
        write_jsonl_atomic(self._path("labels.jsonl"), frame.to_dict("records"))
        self.report_ = collect(self.run_dir)  # type: ignore[arg-type]
        self._write_report()
        self.slm_ = SLMTagger.load(self._path(f"round-{last}/slm") / "model", device=self.slm.device)
        self.labels_ = frame
        return frame


def read_ner_test(path: str | Path, task: Any) -> Sentences:
    """A held-out test set for the inductive score: it must carry gold tags."""
    test = read_sentences(path, task=task)
    if test.gold is None or any(g is None for g in test.gold):
        raise FreeALError(f"{test.source}: the test set needs gold tags on every sentence")
    return test

"""Named-entity recognition: per sentence, a list of entity spans ``[type, start, end)`` over tokens.

- The LLM lists entities (:func:`freeal.ner_annotate.annotate_sentences`: a per-sentence grammar
  on llama.cpp, strict JSON elsewhere); demonstrations go in as earlier chat turns.
- Written demonstrations (``initial_demos: generated``) are sentences the LLM writes per type; with
  ``verify_demos`` each is also annotated zero-shot as it is written and the two lists merged,
  since a writer asked for one type tends to list only that type (and a sentence found to mention
  another type counts for it, so that type is asked less). ``auto`` means a zero-shot start for
  NER, which ended higher on both measured BC5CDR slices (BENCHMARKS.md).
- A sentence's *signature* is the set of types it holds (``Chemical+Disease``, ``none``), so the
  clean set and the pool show every type and entity-free sentences too. A pool without any entity
  is never shown: measured, it taught the LLM to answer "no entity" everywhere.
- A re-asked sentence takes its new entity list (an entity list has no probabilities to combine);
  an unreadable answer keeps the old list.
- The SLM is a token tagger: fine-tuned in the loop (:class:`freeal.slm.tagger.SLMTagger`); the one
  handed back is a logistic regression on mpnet's layer means
  (:class:`freeal.slm.linear.LinearTagger`, ``deployed_mode``), level in entity F1 and much faster
  to train on a CPU. ``mode: linear`` puts it in the loop too (faster; see :meth:`NER.with_backbone`).
- Final entities (``final_label: combined``): the corpus is made to agree with itself. A word
  sequence the LLM marked as one type in most of the places it occurs is marked so where it was
  missed (:meth:`NER.combine`); the tagger's own predictions on its training sentences mostly
  repeat the LLM's lists, so they are not weighed in.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from freeal.config import Calibration, LoopConfig, SLMConfig
from freeal.data import Sentences, read_sentences
from freeal.errors import FreeALError
from freeal.extras import require
from freeal.kinds.base import Answers, Group, SLMFit, TaskKind
from freeal.llm.cache import CachedAnnotator
from freeal.metrics import ner_report
from freeal.ner import Span, entity_rows, render, spans_from_tags, tag_agreement, tags_from_spans
from freeal.ner_annotate import Demo, annotate_sentences, generate_ner_demonstrations


def as_spans(raw: Any) -> list[Span] | None:
    """Spans read back from JSON (lists) as tuples."""
    return None if raw is None else [(k, int(s), int(e)) for k, s, e in raw]


def merge_spans(first: Sequence[Span], second: Sequence[Span]) -> list[Span]:
    """``first`` plus the spans of ``second`` that overlap none of them."""
    taken = {k for _, s, e in first for k in range(s, e)}
    extra = [sp for sp in second if not any(k in taken for k in range(sp[1], sp[2]))]
    return sorted([*first, *extra], key=lambda sp: sp[1])


class NER(TaskKind):
    name = "ner"
    answer_key = "spans"
    initial_demos = "none"
    #: the tagger's vote over the LLM's: +6.8 entity F1 over zero-shot on 3 BC5CDR slices against
    #: +4.4 at 0.5 (each run's answers re-combined; chosen on 2 slices, checked on the third)
    slm_weight = 2.0
    #: kappa over the entity types a sentence holds runs lower than a classifier's: the linear
    #: tagger's 0.26-0.39 on BC5CDR still gained 4-8 F1 through refinery (BENCHMARKS.md)
    min_kappa = 0.2
    #: the tagger handed back: trained on the same final labels, a logistic regression on mpnet's
    #: layer means was level with the fine-tuned MiniLM tagger on 3 BC5CDR slices (test entity F1
    #: 0.563 against 0.564, steadier) in a sixth of the time (35-39 s against 222-241 s per 300
    #: sentences on 2 cores)
    deployed_mode = "linear"
    weighs_every_round = True
    unit = "sentences"

    # -- data -------------------------------------------------------------------------------------
    def read(self, data: Any, gold: Sequence[Any] | None) -> Sentences:
        """Sentences, a list of token lists, or a list of raw strings (tokenized)."""
        sentences = data if isinstance(data, Sentences) else read_sentences(data, task=self.task)
        if gold is not None:
            sentences = Sentences(sentences.ids, sentences.tokens, [list(g) for g in gold], sentences.source)
        return sentences

    def item_rows(self, items: Sentences) -> list[dict]:
        return [{"id": i, "tokens": t} for i, t in zip(items.ids, items.tokens, strict=True)]

    def texts(self, items: Sentences) -> list[str]:
        return items.texts

    # -- the LLM ----------------------------------------------------------------------------------
    def write_demonstrations(
        self,
        annotator: CachedAnnotator,
        items: Sentences,
        loop: LoopConfig,
        calibrate: Calibration,
        progress: bool,
        say: Callable[[str], None],
    ) -> tuple[list[dict], dict]:
        def check(demos: Sequence[Demo]) -> list[list[Span]]:
            found = annotate_sentences(
                self.task,
                [t for t, _ in demos],
                annotator,
                [(np.arange(len(demos)), [])],
                progress=progress,
                description="demonstrations, zero-shot",
            )
            return [merge_spans(s, more or []) for (_, s), more in zip(demos, found.spans, strict=True)]

        demos, report = generate_ner_demonstrations(
            self.task,
            annotator,
            items.tokens,
            per_type=loop.demos_per_label,
            per_call=loop.demos_per_call,
            style_examples=loop.style_examples,
            temperature=loop.generation_temperature,
            max_calls_per_type=loop.max_calls_per_label,
            seed=loop.seed,
            check=check if loop.verify_demos else None,
        )
        added = report.spans_added_by_check
        checked = "" if added is None else f", {added} entities added zero-shot"
        say(f"wrote {report.kept} sentences ({report.per_type}){checked} in {report.calls} LLM calls")
        return [{"tokens": t, "spans": s} for t, s in demos], asdict(report)

    def demo_text(self, demo: dict) -> str:
        return render(demo["tokens"])

    def demonstration(self, items: Sentences, i: int, answer: Any) -> dict:
        return {"tokens": items.tokens[i], "spans": answer}

    def corrected(self, row: dict, fix: dict) -> dict:
        tokens = row["tokens"]
        spans = [(k, start, end) for k, start, end in fix["spans"]]
        tags = tags_from_spans(len(tokens), spans)
        return {
            **row,
            "tags": tags,
            "entities": entity_rows(tokens, spans),
            "confidence": 1.0,
            "clean": True,
            "agreement": tag_agreement(tags, row["slm_tags"]),
        }

    def signature(self, answer: Any) -> str | None:
        if answer is None:
            return None
        kinds = sorted({k for k, _, _ in answer})
        return "+".join(kinds) if kinds else "none"

    def pool_problem(self, pool: Sequence[dict]) -> str | None:
        if not any(d["spans"] for d in pool):
            return "no clean sentence with an entity to show"
        return None

    def ask(
        self,
        annotator: CachedAnnotator,
        items: Sentences,
        groups: Sequence[Group],
        *,
        calibrate: Calibration,
        progress: bool,
        description: str,
    ) -> Answers:
        found = annotate_sentences(
            self.task,
            items.tokens,
            annotator,
            [
                (members, [(d["tokens"], as_spans(d["spans"]) or []) for d in demos])
                for members, demos in groups
            ],
            progress=progress,
            description=description,
        )
        asked = np.zeros(len(items), dtype=bool)
        for members, _ in groups:
            asked[np.asarray(members, dtype=np.int64)] = True
        return Answers(
            values=[None if s is None else [list(sp) for sp in s] for s in found.spans],
            asked=asked,
            group_notes=[{} for _ in groups],
            stats=found.stats(),
        )

    def merge(self, old: dict, fresh: Answers, i: int, rule: str) -> dict:
        return {"spans": fresh.values[i] if fresh.asked[i] and fresh.values[i] is not None else old["spans"]}

    # -- the SLM ----------------------------------------------------------------------------------
    @staticmethod
    def _tags(answers: Sequence[Any], lengths: Sequence[Sequence[Any]]) -> list[list[str] | None]:
        """Each answer's spans as IOB2 tags over its sentence (its tokens, or gold tags, give the length)."""
        return [
            None if a is None else tags_from_spans(len(n), as_spans(a) or [])
            for a, n in zip(answers, lengths, strict=True)
        ]

    @staticmethod
    def _answers(tags: Sequence[Sequence[str]]) -> list[list[list[Any]]]:
        """The tagger's IOB2 tags as answers (JSON span lists)."""
        return [[list(sp) for sp in spans_from_tags(t)] for t in tags]

    def backbone(self, cfg: SLMConfig) -> str:
        """mpnet for the linear tagger (entity F1 0.565 on its layer means against MiniLM's 0.500 on
        three BC5CDR slices, BENCHMARKS.md), MiniLM for the tagger fine-tuned on a CPU."""
        return "all-mpnet-base-v2" if cfg.mode == "linear" else "all-minilm-l6-v2"

    def with_backbone(self, cfg: SLMConfig) -> SLMConfig:
        """The encoder named, and the mode a tagger has: ``linear`` stays; any other mode, the
        settings' default ``head`` included, is ``finetune``, the loop's default tagger. As the
        loop's tagger the linear one ended level on 3 BC5CDR slices (entity F1 0.610 against
        0.616) with a twelfth of the tagger time, but on a fourth its held-out tag lists agreed
        with the LLM's too little (kappa 0.18 against the fine-tuned tagger's 0.59-0.70), the
        near-chance check stopped refinery and the labels stayed zero-shot (BENCHMARKS.md)."""
        if cfg.mode != "linear":
            cfg = cfg.model_copy(update={"mode": "finetune", "pooling": None})
        return super().with_backbone(cfg)

    def train(
        self, items: Sentences, answers: Sequence[Any], cfg: SLMConfig, on_epoch: Callable[[dict], None]
    ) -> SLMFit:
        require("torch", "transformers", what="the SLM (token tagger)")
        tags = self._tags(answers, items.tokens)
        model = self._tagger(cfg.mode)(self.task.label_names, cfg).fit(items.tokens, tags, on_epoch=on_epoch)
        predicted = self._answers(model.train_tags_)
        return SLMFit(
            model=model,
            predicted=predicted,
            confidence=np.asarray(model.train_confidence_, dtype=np.float64),
            agree=np.asarray(
                [t is not None and p == t for p, t in zip(model.train_tags_, tags, strict=True)]
            ),
            clean=model.clean_mask_,
            clean_prob=model.clean_prob_,
            mean_loss=model.mean_loss_,
            epoch_log=model.epoch_log,
        )

    @staticmethod
    def _tagger(mode: str) -> Any:
        """The tagger class of a mode: a logistic regression on frozen vectors, or fine-tuned."""
        if mode == "linear":
            from freeal.slm.linear import LinearTagger

            return LinearTagger
        from freeal.slm.tagger import SLMTagger

        return SLMTagger

    def load_model(self, folder: Path, device: str) -> Any:
        import json

        try:
            mode = json.loads((folder / "tagger.json").read_text())["config"]["mode"]
        except (OSError, ValueError, KeyError) as exc:
            raise FreeALError(f"{folder}: not a saved tagger ({exc})") from exc
        return self._tagger(mode).load(folder, device=device)

    def predict(self, model: Any, items: Sentences) -> list[Any]:
        return self._answers(model.predict(items.tokens))

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, gold: Sequence[Any], answers: Sequence[Any]) -> dict:
        return ner_report(gold, self._tags(answers, gold))

    def right(self, gold: Any, answer: Any) -> bool:
        return answer is not None and set(as_spans(answer) or []) == set(spans_from_tags(gold))

    def combine(
        self, items: Sentences, rounds: Sequence[tuple[list[dict], list[dict]]], slm_weight: float
    ) -> tuple[list[Any], list[Any]]:
        """A vote of every opinion the run formed, then the corpus's own consistency.

        Why a vote: the LLM's entity lists drift from round to round (on BC5CDR refinery's
        demonstrations moved recall by several points either way), and the tagger, which learns
        from all sentences at once, finds entities the LLM missed in one sentence and marked in
        others. So each entity is kept where at least half of the weight of all rounds' opinions
        holds it: each LLM answer weighs 1, each tagger prediction ``slm_weight`` (overlapping
        winners: the heavier, then the earlier). The confidence of a sentence is how clear its
        least clear decision was (the larger side's share of the weight, 1 when nothing was
        proposed). Then :meth:`_consistent` adds what the LLM marked for the same words elsewhere.
        ``slm_weight`` 0 keeps the LLM's last lists; a sentence it did not answer stays unanswered.
        """
        rows = rounds[-1][0]
        if slm_weight == 0:
            return [r["spans"] for r in rows], [None] * len(rows)
        voted: list[list[Span] | None] = []
        confidence: list[float | None] = []
        for n, row in enumerate(rows):
            if row["spans"] is None:
                voted.append(None)
                confidence.append(None)
                continue
            weights: Counter = Counter()
            total = 0.0
            for llm_rows, fit_rows in rounds:
                for answer, weight in (
                    (llm_rows[n]["spans"], 1.0),
                    (fit_rows[n].get("predicted"), slm_weight),
                ):
                    if answer is not None:
                        total += weight
                        weights.update({tuple(span): weight for span in as_spans(answer) or []})
            kept: list[Span] = []
            for span, weight in sorted(weights.items(), key=lambda e: (-e[1], e[0][1], e[0][2])):
                if weight >= total / 2 - 1e-9 and all(e <= span[1] or s >= span[2] for _, s, e in kept):
                    kept.append(span)
            voted.append(sorted(kept, key=lambda sp: sp[1]))
            confidence.append(min((max(w, total - w) / total for w in weights.values()), default=1.0))
        return self._consistent(items, voted), confidence

    @staticmethod
    def _consistent(items: Sentences, spans: list[list[Span] | None]) -> list[list[list[Any]] | None]:
        """``spans`` plus the places they missed a word sequence marked elsewhere: one marked at
        least twice, in at least half of the places it occurs, with one type in at least two thirds
        of them, is added where it overlaps no entity (longest sequences first)."""
        lowered = [[t.lower() for t in tokens] for tokens in items.tokens]
        votes: dict[tuple[str, ...], Counter] = defaultdict(Counter)
        for found, words in zip(spans, lowered, strict=True):
            for kind, start, end in found or []:
                votes[tuple(words[start:end])][kind] += 1
        starting: dict[str, list[tuple[str, ...]]] = defaultdict(list)
        for phrase in votes:
            starting[phrase[0]].append(phrase)
        places: list[tuple[int, int, tuple[str, ...]]] = []
        occurs: Counter = Counter()
        for n, words in enumerate(lowered):
            for start, word in enumerate(words):
                for phrase in starting.get(word, ()):
                    if tuple(words[start : start + len(phrase)]) == phrase:
                        occurs[phrase] += 1
                        places.append((n, start, phrase))
        final = [None if found is None else list(found) for found in spans]
        for n, start, phrase in sorted(places, key=lambda p: -len(p[2])):
            kinds = votes[phrase]
            marked = sum(kinds.values())
            kind, top = kinds.most_common(1)[0]
            sentence = final[n]
            if (
                sentence is None
                or marked < 2
                or marked < 0.5 * occurs[phrase]
                or top < 2 / 3 * marked
                or len(" ".join(phrase)) < 3
            ):
                continue
            end = start + len(phrase)
            if all(e <= start or s >= end for _, s, e in sentence):
                sentence.append((kind, start, end))
                sentence.sort(key=lambda sp: sp[1])
        return [None if f is None else [list(sp) for sp in f] for f in final]

    # -- output -----------------------------------------------------------------------------------
    def output(
        self,
        items: Sentences,
        rows: list[dict],
        fit_rows: list[dict],
        final: list[Any],
        confidence: list[Any],
    ) -> dict[str, list[Any]]:
        spans = [as_spans(answer) for answer in final]
        tags = self._tags(spans, items.tokens)
        slm_tags = self._tags([p["predicted"] for p in fit_rows], items.tokens)
        return {
            "tokens": items.tokens,
            "tags": tags,
            "entities": [
                None if s is None else entity_rows(t, s) for s, t in zip(spans, items.tokens, strict=True)
            ],
            "confidence": confidence,
            "clean": [bool(p["clean"]) for p in fit_rows],
            "round_changed": [r["round_changed"] for r in rows],
            "slm_tags": slm_tags,
            "slm_confidence": [p["confidence"] for p in fit_rows],
            "agreement": [tag_agreement(t, p) for t, p in zip(tags, slm_tags, strict=True)],
        }

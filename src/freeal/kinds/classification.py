"""Sentence classification: one label per text, scored by the LLM label by label.

- The LLM answers by label scoring (:func:`freeal.annotate.label_groups`): every answer is a label
  of the set with probabilities, contextual calibration per group of shared demonstrations.
- Demonstrations for the initial round are written by the LLM per label and checked by it
  zero-shot (:mod:`freeal.demos`).
- A re-asked text's label is, with ``refined_label: combined``, the one its earlier and new answers
  make most probable together; with ``new``, the new answer (the paper).
- The loop's SLM is :class:`freeal.slm.classifier.SLMClassifier` (``head``, ``finetune``); the one
  handed back is by default :class:`freeal.slm.linear.LinearSLM` (``linear``): :func:`slm_class`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freeal.annotate import label_groups
from freeal.config import Calibration, LoopConfig, SLMConfig
from freeal.data import Items, dataset_frame, read_items
from freeal.demos import generate_demonstrations, zero_shot_check
from freeal.extras import require
from freeal.kinds.base import Answers, Group, SLMFit, TaskKind
from freeal.llm.cache import CachedAnnotator
from freeal.metrics import classification_report
from freeal.structure import StructureVote, structure_vote


def slm_class(mode: str) -> Any:
    """The classifier SLM's class for ``SLMConfig.mode``: both fit, predict, save and load alike."""
    if mode == "linear":
        from freeal.slm.linear import LinearSLM

        return LinearSLM
    from freeal.slm.classifier import SLMClassifier

    return SLMClassifier


class Classification(TaskKind):
    name = "classification"
    answer_key = "label"
    initial_demos = "none"
    #: 0.25-0.5 are level on the quality slices, 1-2 hurt TREC, whose SLM is weak (BENCHMARKS.md)
    slm_weight = 0.5
    #: the SLM-LLM kappa below which the SLM is too weak a filter to refine by: 0.33-0.56 on 13 TREC
    #: slices of 300 and 500 texts, where refinery and the SLM's vote lost 2.8 points on the mean
    #: (11 of 13 below zero-shot), against 0.65-0.73 on every 1,000-text slice and 0.70-0.71 on
    #: 300-text sentiment slices, where they gained (BENCHMARKS.md)
    min_kappa = 0.6
    unit = "texts"
    #: on the final labels of 9 slices 1.2-1.9 points from them on the test sets, the head 3.7-4.0
    deployed_mode = "linear"

    def backbone(self, cfg: SLMConfig) -> str:
        """mpnet for a head on frozen embeddings (0.847 against MiniLM's 0.743 on the MR test set
        with gpt-3.5 labels, BENCHMARKS.md; embedding costs about a minute per 1,000 texts on 2
        cores) and for fine-tuning on a GPU (0.892 against 0.836, 21 s per epoch on an H100);
        MiniLM for fine-tuning on a CPU, where mpnet's 5× larger steps would take hours."""
        from freeal.embed import torch_device

        if cfg.mode != "finetune" or torch_device(cfg.device).startswith("cuda"):
            return "all-mpnet-base-v2"
        return "all-minilm-l6-v2"

    # -- data -------------------------------------------------------------------------------------
    def read(self, data: Any, gold: Sequence[Any] | None) -> Items:
        """Lists, Series, DataFrames or ``datasets.Dataset`` (``text``, optional ``id`` and ``label``
        columns), a folder written by ``save_to_disk``, a data file (see :func:`read_items`) or Items."""
        if isinstance(data, Items):
            return data if gold is None else replace(data, gold=list(gold))
        if isinstance(data, (str, os.PathLike)) and not Path(data).is_dir():
            return self.read(read_items(data, task=self.task), gold)  # a data file, read with defaults
        if hasattr(data, "to_pandas") or isinstance(data, (str, os.PathLike)):
            data = dataset_frame(data)
        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame({"text": list(data)})
        if gold is not None:
            frame = frame.assign(label=list(gold))
        return read_items(
            frame,
            id_col="id" if "id" in frame else None,
            label_col="label" if "label" in frame else None,
            task=self.task,
        )

    def item_rows(self, items: Items) -> list[dict]:
        return [{"id": i, "text": t} for i, t in zip(items.ids, items.texts, strict=True)]

    def texts(self, items: Items) -> list[str]:
        return items.texts

    # -- the LLM ----------------------------------------------------------------------------------
    def write_demonstrations(
        self,
        annotator: CachedAnnotator,
        items: Items,
        loop: LoopConfig,
        calibrate: Calibration,
        progress: bool,
        say: Callable[[str], None],
    ) -> tuple[list[dict], dict]:
        demos, report = generate_demonstrations(
            self.task,
            annotator,
            items.texts,
            per_label=loop.demos_per_label,
            per_call=loop.demos_per_call,
            style_examples=loop.style_examples,
            temperature=loop.generation_temperature,
            max_calls_per_label=loop.max_calls_per_label,
            seed=loop.seed,
            check=zero_shot_check(self.task, annotator, calibrate) if loop.verify_demos else None,
        )
        checked = f", {report.verified} of them labeled as intended" if report.verified is not None else ""
        say(f"wrote {report.kept} demonstrations ({report.per_label}){checked} in {report.calls} LLM calls")
        result = asdict(report)
        return [{"text": t, "label": label} for t, label in demos], result

    def demo_text(self, demo: dict) -> str:
        return demo["text"]

    def demonstration(self, items: Items, i: int, answer: Any) -> dict:
        return {"text": items.texts[i], "label": answer}

    def corrected(self, row: dict, fix: dict) -> dict:
        return {**row, "label": fix["label"], "confidence": 1.0, "clean": True}

    def signature(self, answer: Any) -> str | None:
        return answer

    def ask(
        self,
        annotator: CachedAnnotator,
        items: Items,
        groups: Sequence[Group],
        *,
        calibrate: Calibration,
        progress: bool,
        description: str,
    ) -> Answers:
        frame = label_groups(
            self.task,
            items.texts,
            annotator,
            [(members, [(d["text"], d["label"]) for d in demos]) for members, demos in groups],
            calibrate=calibrate,
            progress=progress,
            description=description,
        )
        return Answers(
            values=[None if pd.isna(v) else v for v in frame["label"]],
            asked=frame["asked"].to_numpy(bool),
            columns={col: frame[col].tolist() for col in ("confidence", "probs", "log_scores")},
            group_notes=[{"offsets": o} for o in frame.attrs["group_offsets"]],
            stats={"calibrated": frame.attrs["calibrated"]},
        )

    def merge(self, old: dict, fresh: Answers, i: int, rule: str) -> dict:
        new_label = fresh.values[i]
        if not fresh.asked[i] or new_label is None:  # not asked, or abstained: keep the label
            return {k: old[k] for k in ("label", "confidence", "probs", "log_scores")}
        row = {"label": new_label, **{k: fresh.columns[k][i] for k in ("confidence", "probs", "log_scores")}}
        old_p, new_p = old.get("probs"), row["probs"]
        if rule == "combined" and isinstance(old_p, dict) and isinstance(new_p, dict):
            # the label the two answers make most probable together: a label changes only when the
            # new prompt outweighs the old one (raw log_scores stay the new answer's)
            names = self.task.label_names
            joint = np.asarray([old_p[n] * new_p[n] for n in names], dtype=np.float64)
            joint = joint / joint.sum() if joint.sum() > 0 else np.full(len(names), 1 / len(names))
            best = int(np.argmax(joint))
            row.update(
                label=names[best],
                confidence=float(joint[best]),
                probs=dict(zip(names, joint.tolist(), strict=True)),
            )
        return row

    # -- the SLM ----------------------------------------------------------------------------------
    def train(
        self, items: Items, answers: Sequence[Any], cfg: SLMConfig, on_epoch: Callable[[dict], None]
    ) -> SLMFit:
        require("torch", "transformers", what="the SLM (classifier)")
        from freeal.slm.folds import fit_with_held_out

        labels = list(answers)
        if cfg.mode == "linear":  # its held-out probabilities come with the fit
            model = slm_class(cfg.mode)(self.task.label_names, cfg).fit(
                items.texts, labels, on_epoch=on_epoch
            )
            return self._slm_fit(model, answers, model.held_out_proba_)
        embedder = None
        if cfg.mode == "head":  # embed once for the model and its folds
            from freeal.embed import Embedder, encoder_path, torch_device

            embedder = Embedder(
                encoder_path(cfg.backbone),
                device=torch_device(cfg.device),
                remember=True,
                pooling=cfg.pooling or "sentence",
            )
        # held out (cross-fitting): a model's opinion of its own training labels is mostly the
        # labels, memorised
        model, held_out = fit_with_held_out(
            self.task.label_names, cfg, items.texts, labels, embedder, on_epoch=on_epoch
        )
        return self._slm_fit(model, answers, model.train_proba_ if held_out is None else held_out)

    def _slm_fit(self, model: Any, answers: Sequence[Any], proba: np.ndarray) -> SLMFit:
        """What the loop reads of a fitted SLM: ``proba`` is each item's held-out opinion."""
        names = self.task.label_names
        predicted = [names[i] for i in proba.argmax(1)]
        return SLMFit(
            model=model,
            predicted=predicted,
            confidence=proba.max(1),
            agree=np.asarray([a is not None and a == p for a, p in zip(answers, predicted, strict=True)]),
            clean=model.clean_mask_,
            clean_prob=model.clean_prob_,
            mean_loss=model.mean_loss_,
            epoch_log=model.epoch_log,
            proba=proba,
            labels=names,
        )

    def combine(
        self, items: Items, rounds: Sequence[tuple[list[dict], list[dict]]], slm_weight: float
    ) -> tuple[list[Any], list[Any]]:
        """The label the LLM's last probabilities and the SLM's (held-out) probabilities make most
        probable together: ``p_llm * p_slm ** slm_weight``, renormalised; its probability is the
        confidence. An item the LLM left unanswered takes the SLM's label; without SLM
        probabilities (``cross_fit`` and the model's own off) the LLM's answer stands."""
        rows, fit_rows = rounds[-1]
        names = self.task.label_names
        final, confidence = [], []
        for row, fit in zip(rows, fit_rows, strict=True):
            llm, slm = row.get("probs"), fit.get("probs")
            if not isinstance(slm, dict) or slm_weight == 0:
                final.append(row["label"])
                confidence.append(row.get("confidence"))
                continue
            score = np.asarray([slm[n] for n in names], dtype=np.float64) ** slm_weight
            if isinstance(llm, dict):
                score = score * np.asarray([llm[n] for n in names], dtype=np.float64)
            total = score.sum()
            score = score / total if total > 0 else np.full(len(names), 1 / len(names))
            best = int(np.argmax(score))
            final.append(names[best])
            confidence.append(float(score[best]))
        return final, confidence

    def structure_vote(
        self, items: Items, rows: Sequence[dict], cfg: SLMConfig
    ) -> tuple[list[Any], list[float], StructureVote] | None:
        """The cluster vote of :mod:`freeal.structure` over the SLM encoder's sentence vectors (mpnet
        by default: sentiment clusters there, not in MiniLM's space) of the LLM's probabilities."""
        require("torch", "sentence_transformers", what="the structure vote")
        from freeal.embed import Embedder, encoder_path, torch_device

        names = self.task.label_names
        answered = np.asarray([isinstance(r.get("probs"), dict) for r in rows])
        if answered.sum() < 2 * len(names):
            return None
        proba = np.asarray(
            [
                [r["probs"][n] for n in names] if ok else [1 / len(names)] * len(names)
                for r, ok in zip(rows, answered, strict=True)
            ],
            dtype=np.float64,
        )
        embedder = Embedder(encoder_path(self.with_backbone(cfg).backbone), device=torch_device(cfg.device))
        found = structure_vote(embedder.encode(items.texts), proba, answered)
        return [names[i] for i in found.labels], found.confidence.tolist(), found

    def load_model(self, folder: Path, device: str) -> Any:
        import json

        mode = json.loads((folder / "slm.json").read_text())["config"]["mode"]
        return slm_class(mode).load(folder, device=device)

    def predict(self, model: Any, items: Items) -> list[Any]:
        return model.predict(items.texts)

    # -- scoring ----------------------------------------------------------------------------------
    def score(self, gold: Sequence[Any], answers: Sequence[Any]) -> dict:
        return classification_report(gold, list(answers), self.task.label_names)

    def right(self, gold: Any, answer: Any) -> bool:
        return gold == answer

    # -- output -----------------------------------------------------------------------------------
    def output(
        self, items: Items, rows: list[dict], fit_rows: list[dict], final: list[Any], confidence: list[Any]
    ) -> dict[str, list[Any]]:
        return {
            "text": items.texts,
            "label": final,
            "confidence": confidence,
            "clean": [bool(p["clean"]) for p in fit_rows],
            "round_changed": [r["round_changed"] for r in rows],
            "llm_label": [r["label"] for r in rows],
            "llm_confidence": [r["confidence"] for r in rows],
            "slm_label": [p["predicted"] for p in fit_rows],
            "slm_confidence": [p["confidence"] for p in fit_rows],
        }

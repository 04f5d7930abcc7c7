"""The FreeAL loop: the LLM annotates, the SLM filters, and they alternate.

1. **Initial round.** The LLM writes demonstrations for each label (:mod:`freeal.demos`); every
   text is labeled with its nearest written demonstrations in the prompt.
2. **Robust self-training** of the SLM on those labels (:mod:`freeal.slm`): a clean/noisy split.
3. **Feedback.** The clean set's k-medoids pool becomes the next demonstrations.
4. **Refinery round.** Only the noisy (and abstained) items go back to the LLM, with their nearest
   pool demonstrations; clean items keep their labels. Then 2 again, until the rounds are spent or
   few labels change.

Everything a run produces goes under one folder, one sub-folder per step, and a step is done when
its ``step.json`` exists (written last, atomically). A run killed at any moment and started again
skips the finished steps, and inside an unfinished step the LLM cache answers every call already
made, so no LLM call is paid twice. Gold labels, when given, are used only to score each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from freeal.annotate import label_groups
from freeal.config import LLMConfig, LoopConfig, SLMConfig, cache_root
from freeal.data import Items, read_items, read_jsonl, write_jsonl_atomic, write_text_atomic
from freeal.demos import demonstration_groups, feedback, generate_demonstrations, verify_demonstrations
from freeal.embed import Embedder
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator, Ledger
from freeal.metrics import classification_report
from freeal.slm.classifier import SLMClassifier
from freeal.tasks import Task

log = logging.getLogger(__name__)

#: The file that keeps two processes out of one run folder.
_LOCK = ".lock"

#: LLM settings that change no answer and no label, left out of a run's fingerprint.
_LLM_NOT_FINGERPRINTED = {
    "n_threads",
    "cache_path",
    "max_concurrency",
    "timeout",
    "max_retries",
    "extra_buffers",
    "allow_plain_http",
}


def _as_items(texts: Any, gold: Sequence[str | None] | None, task: Task) -> Items:
    """Any accepted input as :class:`Items` (a DataFrame's ``id`` and ``label`` columns are used)."""
    if isinstance(texts, Items):
        return texts if gold is None else replace(texts, gold=list(gold))
    frame = texts if isinstance(texts, pd.DataFrame) else pd.DataFrame({"text": list(texts)})
    if gold is not None:
        frame = frame.assign(label=list(gold))
    return read_items(
        frame,
        id_col="id" if "id" in frame else None,
        label_col="label" if "label" in frame else None,
        task=task,
    )


def fingerprint(
    task: Task,
    items: Items,
    llm: LLMConfig,
    slm: SLMConfig,
    loop: LoopConfig,
    *,
    models: dict[str, str],
) -> dict:
    """Everything that decides a run's labels, as plain data (texts by their hash). ``models``
    names the annotator, the embedder and the SLM's backbone by what they are (model file, server
    URL actually used, weights), since an injected annotator or a changed folder is not in the
    configs."""
    digest = hashlib.sha256()
    for item_id, text in zip(items.ids, items.texts, strict=True):
        digest.update(f"{item_id}\x00{text}\x01".encode())
    return {
        "task": task.model_dump(),
        "texts": {"n": len(items), "sha256": digest.hexdigest()},
        "llm": llm.model_dump(mode="json", exclude=_LLM_NOT_FINGERPRINTED),
        "slm": slm.model_dump(mode="json"),
        "loop": loop.model_dump(mode="json"),
        "models": models,
    }


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            d
            for k in sorted(old.keys() | new.keys())
            for d in _differences(old.get(k), new.get(k), f"{where}{k}.")
        ]
    return [] if old == new else [where.rstrip(".")]


class FreeAL:
    """Label texts with no human in the loop (scikit-learn style: plain parameters, then ``fit``).

    ``run_dir`` holds every step of the run and makes it resumable; by default a folder under the
    freeal cache named by the run's fingerprint, so calling ``fit`` again with the same texts and
    settings resumes or returns the finished run. ``annotator`` and ``embedder`` replace the ones
    the configs would build (e.g. to share a loaded model between runs).

    After :meth:`fit`: ``labels_`` (the returned DataFrame), ``slm_`` (the last round's SLM),
    ``report_`` (per-round numbers, see :mod:`freeal.report`) and ``run_dir``.
    """

    def __new__(cls, task: Task, *args: Any, **kwargs: Any) -> FreeAL:
        """``FreeAL(task, ...)`` on a ``kind: ner`` task gives the NER loop (same API and run folder)."""
        if cls is FreeAL and task.kind == "ner":
            from freeal.ner_loop import FreeALNER

            return super().__new__(FreeALNER)
        return super().__new__(cls)

    def __init__(
        self,
        task: Task,
        llm: LLMConfig | None = None,
        slm: SLMConfig | None = None,
        loop: LoopConfig | None = None,
        *,
        run_dir: str | Path | None = None,
        annotator: CachedAnnotator | None = None,
        embedder: Embedder | None = None,
        progress: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.task = task
        self.llm = llm or LLMConfig()
        self.slm = slm or SLMConfig()
        loop = loop or LoopConfig()
        if loop.initial_demos == "auto":  # resolved here, so the run's fingerprint names the choice
            loop = loop.model_copy(update={"initial_demos": "none" if task.kind == "ner" else "generated"})
        self.loop = loop
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._annotator = annotator
        self._embedder = embedder
        self.progress = progress
        self.say = say or log.info

    # -- entry point ------------------------------------------------------------------------------
    def fit(
        self, texts: Any, gold: Sequence[str | None] | None = None, *, test: Items | None = None
    ) -> pd.DataFrame:
        """Run (or resume) the loop on ``texts``: a list, a Series, a DataFrame with ``text`` (and
        ``id``) columns, or :class:`~freeal.data.Items`.

        ``gold`` (or ``Items.gold``) and ``test`` are used only to score the rounds. Returns one row
        per text: ``id, text, label, confidence, clean, round_changed, slm_label, slm_confidence``.
        """
        items = self._as_input(texts, gold)
        self.items, self.gold, self.test = items, items.gold, test
        spec = fingerprint(self.task, items, self.llm, self.slm, self.loop, models=self._model_identities())
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
        self.run_dir = self.run_dir or cache_root() / "runs" / f"{self.task.name}-{key}"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.run_dir / _LOCK)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise FreeALError(
                f"{self.run_dir} is in use by another freeal process (lock {lock.lock_file}); wait for "
                "it to finish, or use another run folder"
            ) from None
        try:
            self._claim(spec)
            return self._run()
        finally:
            lock.release()

    def _run(self) -> pd.DataFrame:
        """The algorithm, step by step; each step is skipped when its ``step.json`` exists."""
        self.vectors = self.embedder.encode(self.items.texts)
        if self.loop.zero_shot_baseline:
            self._step("zero-shot", self._zero_shot)
        if self.loop.initial_demos == "generated":
            self._step("demos", self._write_demos)
        self._step("round-0/llm", self._initial_round)
        self._step("round-0/slm", lambda: self._train(0))
        last = 0
        for r in range(1, self.loop.refinery_rounds + 1):
            if r > 1 and self._summary(f"round-{r - 1}/llm")["changed_share"] < self.loop.min_change:
                self.say(f"labels settled after round {r - 1}: stopping")
                break
            self._step(f"round-{r}/llm", lambda r=r: self._refine(r))
            self._step(f"round-{r}/slm", lambda r=r: self._train(r))
            last = r
        return self._finish(last)

    def _model_identities(self) -> dict[str, str]:
        from freeal.embed import encoder_path, weights_identity
        from freeal.llm import annotator_identity

        return {
            "annotator": self._annotator.identity if self._annotator else annotator_identity(self.llm),
            "embedder": self.embedder.identity,
            "backbone": weights_identity(encoder_path(self.slm.backbone)),
        }

    def _as_input(self, texts: Any, gold: Sequence[str | None] | None) -> Any:
        return _as_items(texts, gold, self.task)

    def _item_rows(self) -> list[dict]:
        """What ``items.jsonl`` keeps of the input (the run folder then holds everything labeled)."""
        return [{"id": i, "text": t} for i, t in zip(self.items.ids, self.items.texts, strict=True)]

    @property
    def annotator(self) -> CachedAnnotator:
        if self._annotator is None:
            from freeal.llm import make_annotator

            self._annotator = make_annotator(self.llm)
        return self._annotator

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(device=self.slm.device)
        return self._embedder

    # -- run folder -------------------------------------------------------------------------------
    def _claim(self, spec: dict) -> None:
        """Start a run folder, or check that the one found holds this very run."""
        assert self.run_dir is not None
        marker = self.run_dir / "run.json"
        if marker.is_file():
            old = json.loads(marker.read_text())
            changed = _differences(old, spec)
            if changed:
                raise FreeALError(
                    f"{self.run_dir} holds a run with other settings or texts (differs in: "
                    f"{', '.join(changed[:6])}); use another run folder (LLM answers are cached, "
                    "so no LLM call is paid twice) or delete this one"
                )
            self.say(f"resuming the run in {self.run_dir}")
        else:
            if any(p.name != _LOCK for p in self.run_dir.iterdir()):
                raise FreeALError(f"{self.run_dir} exists and is not a freeal run folder; choose another")
            # run.json first: a kill before the next write leaves a folder that resumes
            write_text_atomic(marker, json.dumps(spec, indent=2))
        if not (self.run_dir / "items.jsonl").is_file():
            write_jsonl_atomic(self.run_dir / "items.jsonl", self._item_rows())

    def _step(self, name: str, compute: Callable[[], dict]) -> dict:
        done = self.run_dir / name / "step.json"  # type: ignore[operator]
        if done.is_file():
            return json.loads(done.read_text())
        self.say(f"step {name}")
        before = replace(self._annotator.ledger) if self._annotator is not None else Ledger()
        start = time.perf_counter()
        result = {"step": name, **compute()}
        result["seconds"] = time.perf_counter() - start
        if self._annotator is not None:  # built lazily: an SLM step never loads the LLM
            result["llm_usage"] = self._annotator.ledger.since(before).to_json()
        write_text_atomic(done, json.dumps(result, indent=2, default=_plain))
        return result

    def _summary(self, name: str) -> dict:
        return json.loads((self.run_dir / name / "step.json").read_text())  # type: ignore[operator]

    def _path(self, name: str) -> Path:
        return self.run_dir / name  # type: ignore[operator]

    # -- scoring (gold only) ----------------------------------------------------------------------
    def _score(self, labels: Sequence[str | None]) -> dict | None:
        if self.gold is None:
            return None
        return classification_report(self.gold, labels, self.task.label_names)

    # -- LLM steps --------------------------------------------------------------------------------
    def _labels_file(self, name: str) -> pd.DataFrame:
        frame = pd.DataFrame(read_jsonl(self._path(name) / "labels.jsonl"))
        frame["label"] = frame["label"].astype(object).where(frame["label"].notna(), None)
        return frame

    def _write_round(
        self,
        name: str,
        frame: pd.DataFrame,
        groups: list[tuple[np.ndarray, list[tuple[str, str]]]],
        offsets: list[list[float] | None],
    ) -> None:
        out = frame.assign(id=self.items.ids)[
            ["id", "label", "confidence", "probs", "log_scores", "asked", "changed", "round_changed"]
        ]
        write_jsonl_atomic(self._path(name) / "labels.jsonl", out.to_dict("records"))
        write_jsonl_atomic(
            self._path(name) / "groups.jsonl",
            [
                {
                    "items": [self.items.ids[i] for i in members],
                    "demonstrations": [{"text": t, "label": lab} for t, lab in demos],
                    "offsets": found,
                }
                for (members, demos), found in zip(groups, offsets, strict=True)
            ],
        )

    def _label(self, groups: list, calibrate: str, description: str) -> pd.DataFrame:
        return label_groups(
            self.task,
            self.items.texts,
            self.annotator,
            groups,
            calibrate=calibrate,  # type: ignore[arg-type]
            progress=self.progress,
            description=description,
        )

    def _zero_shot(self) -> dict:
        groups = [(np.arange(len(self.items)), [])]
        frame = self._label(groups, self.llm.calibrate, "zero-shot")
        offsets, calibrated = frame.attrs["group_offsets"], frame.attrs["calibrated"]
        frame = frame.assign(changed=False, round_changed=None)
        self._write_round("zero-shot", frame, groups, offsets)
        return {
            "calibrated": calibrated,
            "asked": len(frame),
            "metrics": self._score(frame["label"]),
        }

    def _write_demos(self) -> dict:
        cfg = self.loop
        demos, report = generate_demonstrations(
            self.task,
            self.annotator,
            self.items.texts,
            per_label=cfg.demos_per_label,
            per_call=cfg.demos_per_call,
            style_examples=cfg.style_examples,
            temperature=cfg.generation_temperature,
            max_calls_per_label=cfg.max_calls_per_label,
            seed=cfg.seed,
        )
        self.say(f"wrote {report.kept} demonstrations ({report.per_label}) in {report.calls} LLM calls")
        result = asdict(report)
        if cfg.verify_demos:
            demos, result["verified_per_label"] = verify_demonstrations(
                self.task, self.annotator, demos, calibrate=self.llm.calibrate
            )
            result["verified"] = len(demos)
            self.say(f"kept {len(demos)} that the LLM labels as intended ({result['verified_per_label']})")
        write_jsonl_atomic(
            self._path("demos") / "demos.jsonl", [{"text": t, "label": lab} for t, lab in demos]
        )
        return result

    def _groups(
        self, ask: np.ndarray, demos: list, demo_vectors: np.ndarray, labels: list[str] | None = None
    ) -> list:
        """Items to ask with the demonstrations each group shares (``labels``: the demonstrations'
        classes for balancing; by default their second field)."""
        cfg = self.loop
        found = demonstration_groups(
            self.vectors[ask],
            demo_vectors,
            labels if labels is not None else [lab for _, lab in demos],
            k=cfg.k,
            balanced=cfg.balanced,
            group_size=cfg.group_size,
            seed=cfg.seed,
        )
        return [(ask[members], [demos[j] for j in picked]) for members, picked in found]

    def _initial_round(self) -> dict:
        if self.loop.initial_demos == "generated":
            demos = [(r["text"], r["label"]) for r in read_jsonl(self._path("demos") / "demos.jsonl")]
            vectors = self.embedder.encode([t for t, _ in demos])
            groups = self._groups(np.arange(len(self.items)), demos, vectors)
        else:
            groups = [(np.arange(len(self.items)), [])]
        frame = self._label(groups, self.llm.calibrate, "round 0")
        offsets, calibrated = frame.attrs["group_offsets"], frame.attrs["calibrated"]
        frame = frame.assign(changed=False, round_changed=0)
        self._write_round("round-0/llm", frame, groups, offsets)
        return {
            "round": 0,
            "calibrated": calibrated,
            "asked": len(frame),
            "groups": len(groups),
            "changed_share": 1.0,
            "metrics": self._score(frame["label"]),
        }

    def _refine(self, r: int) -> dict:
        previous = self._labels_file(f"round-{r - 1}/llm")
        slm = pd.DataFrame(read_jsonl(self._path(f"round-{r - 1}/slm") / "predictions.jsonl"))
        pool = read_jsonl(self._path(f"round-{r - 1}/slm") / "pool.jsonl")
        pool_idx = np.asarray([p["index"] for p in pool], dtype=np.int64)
        labels = previous["label"].tolist()
        noisy = ~slm["clean"].to_numpy(bool) | previous["label"].isna().to_numpy()
        noisy[pool_idx] = False  # pool members are shown as demonstrations; their labels stand
        ask = np.flatnonzero(noisy)
        demos = [(self.items.texts[p["index"]], p["label"]) for p in pool]
        groups = self._groups(ask, demos, self.vectors[pool_idx]) if len(ask) else []
        # Calibrate as the initial round decided: the noisy items alone are a skewed sample.
        calibrate = self.llm.calibrate
        if calibrate == "auto":
            calibrate = "on" if self._summary("round-0/llm")["calibrated"] else "off"
        fresh = self._label(groups, calibrate, f"round {r}")
        asked = fresh["asked"].to_numpy(bool)
        if self.loop.refined_label == "combined":
            fresh = _combine(previous, fresh, self.task.label_names)
        # An abstention (no label could be had) never erases the label the text already has.
        answered = asked & fresh["label"].notna().to_numpy()
        frame = previous.copy()
        for col in ("label", "confidence", "probs", "log_scores"):
            frame[col] = [f if a else p for f, p, a in zip(fresh[col], previous[col], answered, strict=True)]
        frame["asked"] = asked
        frame["changed"] = [a and f != p for f, p, a in zip(frame["label"], labels, asked, strict=True)]
        frame["round_changed"] = [
            r if c else rc for c, rc in zip(frame["changed"], previous["round_changed"], strict=True)
        ]
        self._write_round(f"round-{r}/llm", frame, groups, fresh.attrs["group_offsets"])
        result = {
            "round": r,
            "calibrated": calibrate == "on",
            "asked": int(asked.sum()),
            "groups": len(groups),
            "changed": int(frame["changed"].sum()),
            "changed_share": float(frame["changed"].mean()),
            "metrics": self._score(frame["label"]),
        }
        if self.gold is not None:
            right_before = [g == p for g, p in zip(self.gold, labels, strict=True)]
            right_after = [g == p for g, p in zip(self.gold, frame["label"], strict=True)]
            result["fixed"] = int(sum(a and not b for a, b in zip(right_after, right_before, strict=True)))
            result["broken"] = int(sum(b and not a for a, b in zip(right_after, right_before, strict=True)))
            result["asked_accuracy_before"] = (
                float(np.mean([right_before[i] for i in ask])) if len(ask) else None
            )
        return result

    # -- SLM step ---------------------------------------------------------------------------------
    def _train(self, r: int) -> dict:
        labels = self._labels_file(f"round-{r}/llm")["label"].tolist()

        def show(entry: dict) -> None:
            self.say(
                f"  SLM epoch {entry['epoch']}/{self.slm.epochs}: loss {entry['loss']:.4f}, "
                f"clean {entry['clean_fraction']:.3f}, {entry['seconds']:.1f} s"
            )

        model = SLMClassifier(self.task.label_names, self.slm).fit(self.items.texts, labels, on_epoch=show)
        folder = self._path(f"round-{r}/slm")
        model.save(folder / "model")
        names = self.task.label_names
        predicted = [names[i] for i in model.train_proba_.argmax(1)]
        fb = feedback(
            labels,
            predicted,
            model.mean_loss_,
            self.vectors,
            fraction=self.loop.clean_fraction,
            pool_size=self.loop.pool_size,
            seed=self.loop.seed,
        )
        result = self._write_slm_step(r, model, predicted, model.train_proba_.max(1), fb)
        if self.gold is not None:
            result["transductive"] = classification_report(self.gold, predicted, names)
            clean = np.flatnonzero(model.clean_mask_)
            result["clean_precision"] = (
                float(np.mean([labels[i] == self.gold[i] for i in clean])) if len(clean) else None
            )
            noisy = np.flatnonzero(~model.clean_mask_)
            result["noisy_precision"] = (
                float(np.mean([labels[i] == self.gold[i] for i in noisy])) if len(noisy) else None
            )
        if self.test is not None and self.test.gold is not None:
            result["inductive"] = classification_report(self.test.gold, model.predict(self.test.texts), names)
        return result

    def _write_slm_step(self, r: int, model: Any, predicted: list, confidence: np.ndarray, fb: Any) -> dict:
        """The SLM step's files (per-item predictions with clean flags, the pool) and its summary;
        shared by the classification and NER loops (``model`` has ``clean_mask_``, ``clean_prob_``,
        ``mean_loss_`` and ``epoch_log``)."""
        folder = self._path(f"round-{r}/slm")
        write_jsonl_atomic(
            folder / "predictions.jsonl",
            [
                {
                    "id": self.items.ids[i],
                    "predicted": predicted[i],
                    "confidence": float(confidence[i]),
                    "clean": bool(model.clean_mask_[i]),
                    "clean_prob": float(model.clean_prob_[i]),
                    "mean_loss": None if np.isnan(model.mean_loss_[i]) else float(model.mean_loss_[i]),
                }
                for i in range(len(self.items))
            ],
        )
        write_jsonl_atomic(
            folder / "pool.jsonl", [{"id": self.items.ids[d.index], **d.to_json()} for d in fb.pool]
        )
        return {
            "round": r,
            "epochs": model.epoch_log,
            "noisy_share": float(1 - model.clean_mask_.mean()),
            "clean_set": len(fb.clean),
            "pool": len(fb.pool),
        }

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self, last: int) -> pd.DataFrame:
        from freeal.report import collect

        labels = self._labels_file(f"round-{last}/llm")
        slm = pd.DataFrame(read_jsonl(self._path(f"round-{last}/slm") / "predictions.jsonl"))
        frame = pd.DataFrame(
            {
                "id": self.items.ids,
                "text": self.items.texts,
                "label": labels["label"],
                "confidence": labels["confidence"],
                "clean": slm["clean"].astype(bool),
                "round_changed": labels["round_changed"],
                "slm_label": slm["predicted"],
                "slm_confidence": slm["confidence"],
            }
        )
        write_jsonl_atomic(self._path("labels.jsonl"), frame.to_dict("records"))
        self.report_ = collect(self.run_dir)  # type: ignore[arg-type]
        self._write_report()
        self.slm_ = SLMClassifier.load(self._path(f"round-{last}/slm") / "model", device=self.slm.device)
        self.labels_ = frame
        return frame

    def _write_report(self) -> None:
        from freeal.report import write_html

        write_text_atomic(self._path("report.json"), json.dumps(self.report_, indent=2, default=_plain))
        write_html(self.report_, self._path("report.html"))


def _combine(previous: pd.DataFrame, fresh: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """The refinery answers merged with the earlier ones: label and confidence from the normalized
    product of the two answers' probabilities (the raw ``log_scores`` stay the new answer's). Where
    either answer has no probabilities (an abstention, a parsed answer) the new answer stands."""
    out = fresh.copy()
    for i in np.flatnonzero(fresh["asked"].to_numpy(bool)):
        old, new = previous["probs"].iloc[i], fresh["probs"].iloc[i]
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        joint = np.asarray([old[n] * new[n] for n in names], dtype=np.float64)
        joint = joint / joint.sum() if joint.sum() > 0 else np.full(len(names), 1 / len(names))
        best = int(np.argmax(joint))
        out.at[out.index[i], "label"] = names[best]
        out.at[out.index[i], "confidence"] = float(joint[best])
        out.at[out.index[i], "probs"] = dict(zip(names, joint.tolist(), strict=True))
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")

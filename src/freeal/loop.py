"""The FreeAL loop: the LLM annotates, the SLM filters, and they alternate.

::

    demonstrations      the LLM writes some per label (or none: a zero-shot start)
    round 0 / llm       every item is labeled, with its nearest demonstrations in the prompt
    repeat R times:
      round r / slm     robust self-training of the SLM on the current labels: clean/noisy split
      round r / feedback  clean set (SLM and LLM agree, lowest loss) -> k-medoids pool; noisy set
      round r+1 / llm   refinery: only the noisy items are asked again, with their nearest pool members
                        (none noisy, or the SLM too weak to sort the answers: the repeat ends here)
    finish              labels.jsonl, report.json, report.html

The loop is the same for every kind of task; what a step means for classification or NER (how
the LLM is asked, what an answer is, which SLM learns it) comes from the task's
:class:`~freeal.kinds.base.TaskKind`. Everything a run produces goes under one folder, one
sub-folder per step; a step is done when its ``step.json`` exists (written last, atomically). A run
killed at any moment and started again skips the finished steps, and inside an unfinished step the
LLM cache answers every call already made, so no LLM call is paid twice. Gold labels, when given,
are used only to score each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock, Timeout

from freeal.config import LLMConfig, LoopConfig, SLMConfig, cache_root, run_key
from freeal.data import iter_jsonl, read_jsonl, write_jsonl_atomic, write_text_atomic
from freeal.demos import demonstration_groups
from freeal.embed import Embedder
from freeal.errors import FreeALError
from freeal.export import apply_corrections, read_corrections
from freeal.feedback import feedback
from freeal.kinds import kind_of
from freeal.kinds.base import Answers, Group
from freeal.llm.cache import CachedAnnotator, Ledger
from freeal.progress import slm_line
from freeal.structure import MAX_AGREEMENT, MIN_CHECK_KAPPA
from freeal.tasks import Task

log = logging.getLogger(__name__)

#: The file that keeps two processes out of one run folder.
_LOCK = ".lock"

#: LLM settings that change no answer and no label, left out of a run's fingerprint (in
#: ``model_dump``'s ``exclude`` form). An endpoint's own limits are left out too, so its entry reads as
#: it did before endpoints had limits, and a run made then still resumes.
_LLM_NOT_FINGERPRINTED: dict[str, Any] = {
    **dict.fromkeys(
        (
            "n_threads",
            "batch_tokens",
            "cache_path",
            "max_concurrency",
            "timeout",
            "max_retries",
            "extra_buffers",
            "allow_plain_http",
        ),
        True,
    ),
    "endpoints": {"__all__": {"max_concurrency", "requests_per_minute", "tokens_per_minute"}},
}


def fingerprint(
    task: Task,
    items: Any,
    texts: Sequence[str],
    llm: LLMConfig,
    slm: SLMConfig,
    loop: LoopConfig,
    *,
    models: dict[str, str],
) -> dict:
    """Everything that decides a run's labels, as plain data (items by their hash). ``models``
    names the annotator, the embedder and the SLM's backbone by what they are (model file, server
    URL actually used, weights), since an injected annotator or a changed folder is not in the
    configs."""
    digest = hashlib.sha256()
    for item_id, text in zip(items.ids, texts, strict=True):
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
    """Label texts (or sentences, for NER) with no human in the loop: plain parameters, then ``fit``.

    ``llm``, ``slm`` and ``loop`` are the three stages' settings (kept as ``llm_config``,
    ``slm_config``, ``loop_config``, resolved per kind; ``deployed_config`` holds the settings of
    the SLM handed back). ``run_dir`` holds every step of the run and makes it
    resumable; by default a folder under the freeal cache named by the run's fingerprint, so
    calling ``fit`` again with the same input and settings resumes or returns the finished run.
    ``annotator`` and ``embedder`` replace the ones the configs would build (e.g. to share a loaded
    model between runs); they are part of the fingerprint by identity.

    After :meth:`fit`: ``labels_`` (the returned DataFrame), ``slm_`` (the SLM to deploy: trained
    on the final labels, or the last round's, as ``deployed_slm`` says; saved in ``slm_path_``),
    ``report_`` (per-round numbers, see :mod:`freeal.report`) and ``run_dir``.
    """

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
        self.kind = kind_of(task)
        self.llm_config = llm or LLMConfig()
        slm = slm or SLMConfig()
        # resolved here, per kind, so the run's fingerprint names the choices
        self.slm_config = self.kind.with_backbone(slm)
        self.loop_config = self.kind.with_defaults(loop or LoopConfig())
        self.deployed_config = self.kind.deployed_settings(slm, self.loop_config)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._annotator = annotator
        self._embedder = embedder
        self.progress = progress
        self.say = say or log.info
        self.fixed: dict[int, Any] = {}  # a person's answers by item position, read when fit starts

    # -- entry point ------------------------------------------------------------------------------
    def fit(self, data: Any, gold: Sequence[Any] | None = None, *, test: Any = None) -> pd.DataFrame:
        """Run (or resume) the loop on ``data``.

        Classification: a list, a Series, a DataFrame with ``text`` (and ``id``, ``label``)
        columns, or :class:`~freeal.data.Items`. NER: :class:`~freeal.data.Sentences`, token lists
        or raw strings. ``gold`` (or the container's gold) and ``test`` (held-out items with gold)
        are used only to score the rounds. Returns one row per item (see the README).
        """
        self.items = self.kind.read(data, gold)
        self.gold, self.test = self.items.gold, test
        texts = self.kind.texts(self.items)
        spec = fingerprint(
            self.task,
            self.items,
            texts,
            self.llm_config,
            self.slm_config,
            self.loop_config,
            models=self._model_identities(),
        )
        self.run_dir = self.run_dir or cache_root() / "runs" / f"{self.task.name}-{run_key(spec)}"
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
            # read once: only ``freeal import`` changes them, and it needs the lock this run holds
            self.fixed = self._read_corrections()
            self.vectors = self.embedder.encode(texts)
            return self._run()
        finally:
            lock.release()

    def _run(self) -> pd.DataFrame:
        """The algorithm box of the paper, step by step; a step whose ``step.json`` exists is skipped."""
        cfg = self.loop_config
        if cfg.zero_shot_baseline:
            self._step("zero-shot", self._zero_shot)
        if cfg.initial_demos == "generated":
            self._step("demos", self._write_demonstrations)
        self._step("round-0/llm", self._initial_round)
        self._step("round-0/slm", lambda: self._train(0))
        last = 0
        ended: str | None = None  # why the rounds stopped before refinery_rounds, for the report
        for r in range(1, cfg.refinery_rounds + 1):
            if r > 1 and (changed := self._summary(f"round-{r - 1}/llm")["changed_share"]) < cfg.min_change:
                self.say(f"labels settled after round {r - 1}: stopping")
                ended = (
                    f"The loop ended after round {r - 1}: it changed {changed:.1%} of the labels, "
                    f"fewer than min_change {cfg.min_change:.1%}."
                )
                break
            found = self._step(f"round-{r - 1}/feedback", partial(self._feedback, r - 1))
            if found["noisy"] == 0:
                # nothing to ask again: another SLM would only learn the same labels again
                if "skipped" not in found:  # (a skipped step has said why)
                    self.say(f"round {r}: the SLM doubts no label: stopping")
                why = found.get("skipped") or "the SLM doubted no label"
                ended = f"The loop ended after round {r - 1}'s feedback, no text to ask again: {why}."
                break
            self._step(f"round-{r}/llm", partial(self._refine, r))
            self._step(f"round-{r}/slm", partial(self._train, r))
            last = r
        self._step("final", lambda: self._final(last, ended))
        if cfg.deployed_slm == "final_labels":
            self._step("final/slm", self._train_deployed)
        return self._finish()

    # -- the parts the configs build ---------------------------------------------------------------
    @property
    def annotator(self) -> CachedAnnotator:
        if self._annotator is None:
            from freeal.llm import make_annotator

            self._annotator = make_annotator(self.llm_config)
        return self._annotator

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder(device=self.slm_config.device)
        return self._embedder

    def _model_identities(self) -> dict[str, str]:
        from freeal.embed import encoder_path, weights_identity
        from freeal.llm import annotator_identity

        models = {
            "annotator": self._annotator.identity if self._annotator else annotator_identity(self.llm_config),
            "embedder": self.embedder.identity,
            "backbone": weights_identity(encoder_path(self.slm_config.backbone)),
        }
        if self.deployed_config.backbone != self.slm_config.backbone:  # named only where it differs,
            # so the folders of runs whose deployed SLM shares the loop's encoder still resume
            models["deployed_backbone"] = weights_identity(encoder_path(self.deployed_config.backbone))
        return models

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
            write_jsonl_atomic(self.run_dir / "items.jsonl", self.kind.item_rows(self.items))

    def _step(self, name: str, compute: Callable[[], dict]) -> dict:
        done = self._path(name) / "step.json"
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
        return json.loads((self._path(name) / "step.json").read_text())

    def _path(self, name: str) -> Path:
        assert self.run_dir is not None
        return self.run_dir / name

    def _rows(self, name: str) -> list[dict]:
        return read_jsonl(self._path(name) / "labels.jsonl")

    def _answers(self, name: str) -> list[Any]:
        """A round's answers, a person's (``fixed``, :meth:`_read_corrections`) in place of the LLM's."""
        return self._with_fixed(iter_jsonl(self._path(name) / "labels.jsonl"))

    def _with_fixed(self, rows: Iterable[dict]) -> list[Any]:
        """The answers of a round's ``rows``, a person's in place of the LLM's."""
        answers = [r[self.kind.answer_key] for r in rows]
        for i, answer in self.fixed.items():
            answers[i] = answer
        return answers

    def _kappa(self, signatures: Sequence[str | None], fit: list[dict]) -> float | None:
        """How well the SLM (its held-out predictions ``fit``) reproduces the LLM's answers: Cohen's
        kappa; near 0 it learned nothing from them."""
        return agreement_kappa(signatures, [self.kind.signature(p["predicted"]) for p in fit])

    def _read_corrections(self) -> dict[int, Any]:
        """Answers people gave (``freeal import``), by item position. They are fixed for every
        step that runs after the import: never asked again, learnt by the SLM as they are, clean in
        the feedback, and the final label."""
        where = {item_id: i for i, item_id in enumerate(self.items.ids)}
        return {where[i]: row[self.kind.answer_key] for i, row in read_corrections(self._path("")).items()}

    def _not_fixed(self, positions: np.ndarray) -> np.ndarray:
        """``positions`` less the items a person labelled, whose answers are never asked again."""
        fixed = np.fromiter(self.fixed, dtype=np.int64)
        return positions[~np.isin(positions, fixed)]

    # -- scoring (gold only) ----------------------------------------------------------------------
    def _score(self, answers: Sequence[Any]) -> dict | None:
        return None if self.gold is None else self.kind.score(self.gold, answers)

    def _right(self, answers: Sequence[Any]) -> np.ndarray:
        assert self.gold is not None
        return np.asarray([self.kind.right(g, a) for g, a in zip(self.gold, answers, strict=True)])

    # -- LLM steps --------------------------------------------------------------------------------
    def _groups(self, ask: np.ndarray, demos: list[dict], vectors: np.ndarray | None = None) -> list[Group]:
        """Items to ask, grouped, each group with the demonstrations nearest its centroid (or each
        item with its own ``k`` nearest, ``group_size: null``), balanced over the demonstrations'
        signatures. ``vectors``: the demonstrations' embeddings (default: embed their texts)."""
        if not len(ask):
            return []
        if not demos:
            return [(ask, [])]
        cfg = self.loop_config
        if vectors is None:
            vectors = self.embedder.encode([self.kind.demo_text(d) for d in demos])
        signatures = [self.kind.signature(d[self.kind.answer_key]) or "none" for d in demos]
        found = demonstration_groups(
            self.vectors[ask],
            vectors,
            signatures,
            k=cfg.k,
            balanced=cfg.balanced,
            group_size=cfg.group_size,
            seed=cfg.seed,
        )
        return [(ask[members], [demos[j] for j in picked]) for members, picked in found]

    def _write_round(self, name: str, rows: Iterable[dict], groups: list[Group], notes: list[dict]) -> None:
        write_jsonl_atomic(self._path(name) / "labels.jsonl", rows)
        write_jsonl_atomic(
            self._path(name) / "groups.jsonl",
            [
                {"items": [self.items.ids[i] for i in members], "demonstrations": demos, **note}
                for (members, demos), note in zip(groups, notes or [{}] * len(groups), strict=True)
            ],
        )

    def _ask(self, groups: list[Group], calibrate: str, description: str) -> Answers:
        return self.kind.ask(
            self.annotator,
            self.items,
            groups,
            calibrate=calibrate,  # type: ignore[arg-type]
            progress=self.progress,
            description=description,
        )

    def _first_pass(self, name: str, groups: list[Group], round_changed: int | None) -> dict:
        """A pass that asks every item (the zero-shot baseline, the initial round)."""
        fresh = self._ask(
            groups, self.llm_config.calibrate, "zero-shot" if round_changed is None else "round 0"
        )
        rows = (
            {
                "id": self.items.ids[i],
                self.kind.answer_key: fresh.values[i],
                **{col: values[i] for col, values in fresh.columns.items()},
                "asked": bool(fresh.asked[i]),
                "changed": False,
                "round_changed": round_changed,
            }
            for i in range(len(self.items))
        )
        self._write_round(name, rows, groups, fresh.group_notes)
        return {"asked": int(fresh.asked.sum()), **fresh.stats, "metrics": self._score(fresh.values)}

    def _zero_shot(self) -> dict:
        return self._first_pass("zero-shot", [(np.arange(len(self.items)), [])], None)

    def _write_demonstrations(self) -> dict:
        demos, result = self.kind.write_demonstrations(
            self.annotator, self.items, self.loop_config, self.llm_config.calibrate, self.progress, self.say
        )
        write_jsonl_atomic(self._path("demos") / "demos.jsonl", demos)
        return result

    def _initial_round(self) -> dict:
        everything = self._not_fixed(np.arange(len(self.items)))
        demos = (
            read_jsonl(self._path("demos") / "demos.jsonl")
            if self.loop_config.initial_demos == "generated"
            else []
        )
        groups = self._groups(everything, demos)
        result = self._first_pass("round-0/llm", groups, 0)
        return {"round": 0, **result, "groups": len(groups), "changed_share": 1.0}

    def _refine(self, r: int) -> dict:
        where = {item_id: i for i, item_id in enumerate(self.items.ids)}
        folder = self._path(f"round-{r - 1}/feedback")
        ask = np.asarray([where[row["id"]] for row in read_jsonl(folder / "noisy.jsonl")], dtype=np.int64)
        ask = self._not_fixed(ask)  # feedback written before an import may still list them
        members = read_jsonl(folder / "pool.jsonl")
        pool = [{k: v for k, v in p.items() if k not in ("id", "loss")} for p in members]
        at = np.asarray([where[p["id"]] for p in members], dtype=np.int64)
        groups = self._groups(ask, pool, self.vectors[at])  # pool members are items: reuse their vectors
        # Calibrate as the initial round decided: the noisy items alone are a skewed sample.
        calibrate = self.llm_config.calibrate
        if calibrate == "auto":
            calibrate = "on" if self._summary("round-0/llm").get("calibrated") else "off"
        fresh = self._ask(groups, calibrate, f"round {r}")
        key = self.kind.answer_key
        answers: list[Any] = []
        before: list[Any] = []  # the last round's answers, kept only to score against gold
        changed = np.zeros(len(self.items), dtype=bool)

        def rows() -> Iterator[dict]:
            """The last round's rows merged with the new answers, one at a time: a million rows are
            read, merged and written without two rounds of them in memory."""
            last = iter_jsonl(self._path(f"round-{r - 1}/llm") / "labels.jsonl")
            for i, old in zip(range(len(changed)), last, strict=True):
                new = self.kind.merge(old, fresh, i, self.loop_config.refined_label)
                changed[i] = bool(fresh.asked[i]) and new[key] != old[key]
                answers.append(new[key])
                if self.gold is not None:
                    before.append(old[key])
                yield {
                    **old,
                    **new,
                    "asked": bool(fresh.asked[i]),
                    "changed": bool(changed[i]),
                    "round_changed": r if changed[i] else old["round_changed"],
                }

        self._write_round(f"round-{r}/llm", rows(), groups, fresh.group_notes)
        result = {
            "round": r,
            "calibrated": calibrate == "on",
            "asked": int(fresh.asked.sum()),
            "groups": len(groups),
            "changed": int(changed.sum()),
            "changed_share": float(changed.mean()) if len(changed) else float("nan"),
            **fresh.stats,
            "metrics": self._score(answers),
        }
        if self.gold is not None:
            was_right, now_right = self._right(before), self._right(answers)
            result["fixed"] = int((now_right & ~was_right).sum())
            result["broken"] = int((was_right & ~now_right).sum())
            result["asked_accuracy_before"] = float(was_right[ask].mean()) if len(ask) else None
        return result

    # -- SLM step and feedback --------------------------------------------------------------------
    def _train(self, r: int) -> dict:
        """Round ``r``'s SLM, trained robustly on that round's answers: the filter feedback reads."""
        return {"round": r, **self._fit_slm(self._answers(f"round-{r}/llm"), self._path(f"round-{r}/slm"))}

    def _train_deployed(self) -> dict:
        """The SLM a user deploys, trained once more, now on the final labels. NER's vote of every
        round can differ from the last round's answers a good deal: the retrained tagger tested
        +1.4, +12.7 and -1.1 entity F1 against the last round's on BC5CDR. A classifier's final labels
        differ little from the last round's answers, but it is handed back in ``deployed_mode``
        (linear on layer means): +2.2 to +2.8 points over the last round's head on the test sets
        of 9 slices, so it trains even when the labels are the last round's (BENCHMARKS.md)."""
        answers = self._with_fixed(iter_jsonl(self._path("final") / "answers.jsonl"))
        last = self._summary("final")["round"]
        cfg = self.deployed_config
        if cfg == self.slm_config and answers == self._answers(f"round-{last}/llm"):
            return {"same_as_round": last}  # nothing new to learn: that SLM it is
        return self._fit_slm(answers, self._path("final/slm"), cfg)

    def _fit_slm(self, answers: list[Any], folder: Path, cfg: SLMConfig | None = None) -> dict:
        """Train the SLM (the run's, or ``cfg``) on ``answers``; write it and its per-item
        predictions into ``folder``."""
        cfg = cfg or self.slm_config

        fit = self.kind.train(
            self.items, answers, cfg, lambda entry: self.say(f"  SLM {slm_line(entry, cfg)}")
        )
        fit.model.save(folder / "model")
        write_jsonl_atomic(
            folder / "predictions.jsonl",
            (
                {
                    "id": self.items.ids[i],
                    "predicted": fit.predicted[i],
                    "confidence": float(fit.confidence[i]),
                    "agree": bool(fit.agree[i]),
                    "clean": bool(fit.clean[i]),
                    "clean_prob": float(fit.clean_prob[i]),
                    "mean_loss": None if np.isnan(fit.mean_loss[i]) else float(fit.mean_loss[i]),
                    "probs": fit.probs(i),
                }
                for i in range(len(self.items))
            ),
        )
        result: dict = {"epochs": fit.epoch_log, "noisy_share": float(1 - fit.clean.mean())}
        if self.gold is not None:
            result["transductive"] = self.kind.score(self.gold, fit.predicted)
            right = self._right(answers)
            for name, mask in (("clean", fit.clean), ("noisy", ~fit.clean)):
                result[f"{name}_precision"] = float(right[mask].mean()) if mask.any() else None
        if self.test is not None and self.test.gold is not None:
            result["inductive"] = self.kind.score(self.test.gold, self.kind.predict(fit.model, self.test))
        return result

    def _feedback(self, r: int) -> dict:
        """The clean set, its demonstration pool and the noisy set, written by item id."""
        cfg = self.loop_config
        answers = self._answers(f"round-{r}/llm")
        fit = read_jsonl(self._path(f"round-{r}/slm") / "predictions.jsonl")
        signatures = [self.kind.signature(a) for a in answers]
        losses = np.asarray([np.nan if p["mean_loss"] is None else p["mean_loss"] for p in fit])
        # refinery asks what the loss split calls noisy (the paper) or where the SLM disagrees;
        # feedback() adds the unanswered items and leaves out the pool's members either way. A
        # person's answer is clean and never doubted.
        fixed = self.fixed
        agree = [p["agree"] or i in fixed for i, p in enumerate(fit)]
        doubted = [
            i not in fixed and not (p["agree"] if cfg.refine == "disagree" else p["clean"])
            for i, p in enumerate(fit)
        ]
        found = feedback(
            signatures,
            agree,
            doubted,
            losses,
            self.vectors,
            fraction=cfg.clean_fraction,
            pool_size=cfg.pool_size,
            seed=cfg.seed,
        )
        pool = [
            {
                "id": self.items.ids[d.index],
                **self.kind.demonstration(self.items, d.index, answers[d.index]),
                "loss": d.loss,
            }
            for d in found.pool
        ]
        noisy = found.noisy
        result: dict = {"round": r, "clean_set": len(found.clean), "pool": len(pool)}
        problem = self.kind.pool_problem(pool)
        # Can the SLM filter the LLM's answers at all? Little agreement (kappa) between the two
        # says the SLM is too weak to tell right from wrong, or the answers carry little signal:
        # the clean set would be a guess, and demonstrations drawn from it would teach the LLM its
        # own errors. Then no refinery round follows.
        result["kappa"] = self._kappa(signatures, fit)
        if not problem and below_min_kappa(cfg, result["kappa"]):
            problem = (
                f"the SLM reproduces the LLM's answers too weakly to sort them (kappa "
                f"{result['kappa']:.2f} < min_kappa {cfg.min_kappa}): no clean set to refine from"
            )
        if problem:
            self.say(f"round {r + 1}: {problem}; labels kept as they are")
            noisy = np.zeros(0, dtype=np.int64)
            result["skipped"] = problem
        result["noisy"] = len(noisy)
        folder = self._path(f"round-{r}/feedback")
        write_jsonl_atomic(folder / "clean.jsonl", [{"id": self.items.ids[i]} for i in found.clean])
        write_jsonl_atomic(folder / "pool.jsonl", pool)
        write_jsonl_atomic(folder / "noisy.jsonl", [{"id": self.items.ids[i]} for i in noisy])
        if self.gold is not None:
            right = self._right(answers)
            result["clean_set_precision"] = float(right[found.clean].mean()) if len(found.clean) else None
        return result

    # -- the final labels -------------------------------------------------------------------------
    def _round(self, r: int) -> tuple[list[dict], list[dict]]:
        """Round ``r``'s LLM rows and SLM predictions, as :meth:`_final` weighs them."""
        return self._rows(f"round-{r}/llm"), read_jsonl(self._path(f"round-{r}/slm") / "predictions.jsonl")

    def _final(self, last: int, ended: str | None) -> dict:
        """Each item's final answer and confidence: the LLM's last answer weighed with the SLM's
        (:meth:`~freeal.kinds.base.TaskKind.combine`), or the LLM's alone (``final_label: llm``),
        or where the SLM learned too little of them, :meth:`_without_slm`'s."""
        cfg = self.loop_config
        rounds = [self._round(r) for r in (range(last + 1) if self.kind.weighs_every_round else [last])]
        rows, fits = rounds[-1]
        kappa = self._kappa([self.kind.signature(a) for a in self._with_fixed(rows)], fits)
        weight = final_slm_weight(cfg, kappa)
        # why the table lacks rows or the SLM's vote: shown under it (report.html, freeal run)
        notes = [ended] if ended else []
        final, confidence = self.kind.combine(self.items, rounds, weight)
        rule: str = cfg.final_label
        if weight != final_slm_weight(cfg, None):  # the SLM learned too little of the LLM's answers
            final, confidence, rule, note = self._without_slm(rows, kappa, final, confidence)
            notes.append(note)
        key = self.kind.answer_key
        write_jsonl_atomic(
            self._path("final") / "answers.jsonl",
            [
                {"id": item_id, key: answer, "confidence": conf}
                for item_id, answer, conf in zip(self.items.ids, final, confidence, strict=True)
            ],
        )
        llm = [row[key] for row in rows]
        result: dict = {
            "round": last,
            "rule": rule,
            "slm_weight": weight,
            "kappa": kappa,
            "changed_from_llm": sum(a != b for a, b in zip(final, llm, strict=True)),
            "metrics": self._score(final),
            "notes": notes,
        }
        if self.gold is not None:
            result["calibration"] = calibration(self._right(final), confidence)
            before, after = self._right(llm), self._right(final)
            result["fixed"] = int((after & ~before).sum())
            result["broken"] = int((before & ~after).sum())
        return result

    def _without_slm(
        self, rows: list[dict], kappa: float | None, final: list[Any], confidence: list[Any]
    ) -> tuple[list[Any], list[Any], str, str]:
        """The final labels when the SLM reproduces the LLM's answers under ``min_kappa``: the LLM's
        (``final``, ``confidence``), or with ``weak_labels: structure`` the vote of the texts'
        clusters where it passes its tests (:mod:`freeal.structure`); with the rule that made them
        (``llm``, ``structure``: the report's table names it) and a note on why."""
        cfg = self.loop_config
        weak = (
            f"the SLM reproduces its answers too weakly to weigh in "
            f"(kappa {kappa:.2f} < min_kappa {cfg.min_kappa})"
        )
        found = (
            self.kind.structure_vote(self.items, rows, self.slm_config)
            if cfg.weak_labels == "structure"
            else None
        )
        if found is not None and found[2].passed:
            labels, scores, vote = found
            self.say(
                f"final labels: the texts' clusters' vote (SLM kappa {kappa:.2f}, "
                f"check {vote.check_kappa:.2f}, with the LLM {vote.agreement:.2f})"
            )
            return (
                labels,
                scores,
                "structure",
                (
                    f"The final labels are the vote of the texts' clusters over the LLM's answers: {weak}, "
                    f"while the vote predicts the LLM's most distinctive answers held out (kappa "
                    f"{vote.check_kappa:.3f} >= {MIN_CHECK_KAPPA}) and not its labels at large (kappa "
                    f"{vote.agreement:.3f} < {MAX_AGREEMENT}): those follow a bias."
                ),
            )
        self.say(f"final labels: the LLM's alone, the SLM reproduces them too weakly (kappa {kappa:.2f})")
        declined = ""
        if found is not None:
            vote = found[2]
            declined = (
                f" The texts' clusters predict the LLM's most distinctive answers too weakly to replace "
                f"them (kappa {vote.check_kappa:.3f} < {MIN_CHECK_KAPPA})."
                if vote.check_kappa < MIN_CHECK_KAPPA
                else f" The texts' clusters' vote agrees with the LLM's labels (kappa "
                f"{vote.agreement:.3f} >= {MAX_AGREEMENT}): it would only blur them."
            )
        return final, confidence, "llm", f"The final labels are the LLM's alone: {weak}.{declined}"

    # -- the end ----------------------------------------------------------------------------------
    def _finish(self) -> pd.DataFrame:
        from freeal.report import collect, write_html

        summary = self._summary("final")
        rows, fit_rows = self._round(summary["round"])
        answers = read_jsonl(self._path("final") / "answers.jsonl")
        key = self.kind.answer_key
        final, confidence = [a[key] for a in answers], [a["confidence"] for a in answers]
        frame = pd.DataFrame(
            {"id": self.items.ids, **self.kind.output(self.items, rows, fit_rows, final, confidence)}
        )
        split = self._path("final/slm") / "predictions.jsonl"
        if summary["rule"] == "structure" and split.is_file():
            # the loop's SLM split the LLM's labels, which the clusters' vote replaced: the split
            # that describes the final labels is the one the SLM to deploy made of them
            frame["clean"] = [bool(p["clean"]) for p in read_jsonl(split)]
        corrections = read_corrections(self._path(""))
        if corrections:  # a person's answers (freeal import) are the final labels where given
            frame = pd.DataFrame(apply_corrections(self.task, frame.to_dict("records"), corrections))
        records = (
            dict(zip(frame.columns, row, strict=True)) for row in frame.itertuples(index=False, name=None)
        )
        write_jsonl_atomic(self._path("labels.jsonl"), records)  # row by row: no second copy in memory
        self.report_ = collect(self._path(""))
        write_text_atomic(self._path("report.json"), json.dumps(self.report_, indent=2, default=_plain))
        write_html(self.report_, self._path("report.html"))
        deployed = self._path("final/slm")
        if not (deployed / "model").exists():
            deployed = self._path(f"round-{summary['round']}/slm")
        self.slm_path_ = deployed / "model"
        self.slm_ = self.kind.load_model(self.slm_path_, self.slm_config.device)
        self.labels_ = frame
        return frame


def final_slm_weight(cfg: LoopConfig, kappa: float | None) -> float:
    """The SLM's weight in the final labels: ``slm_weight`` under ``final_label: combined``, else 0;
    and 0 when the SLM reproduces the LLM's last answers with a kappa under ``min_kappa``: it learned
    too little from them (an annotator near chance, or too few texts for the classes: BENCHMARKS.md),
    and weighing it in would only add its errors. ``kappa`` None (not measurable) leaves the weight
    as set."""
    weight = (cfg.slm_weight or 0.0) if cfg.final_label == "combined" else 0.0
    return 0.0 if below_min_kappa(cfg, kappa) else weight


def below_min_kappa(cfg: LoopConfig, kappa: float | None) -> bool:
    """Whether the SLM-LLM ``kappa`` falls under ``min_kappa``: then refinery asks no one and the
    final labels leave the SLM out. A kappa that could not be measured, or a ``min_kappa`` no task
    kind has resolved yet (:meth:`~freeal.kinds.base.TaskKind.with_defaults`), sets no floor."""
    return kappa is not None and cfg.min_kappa is not None and kappa < cfg.min_kappa


def agreement_kappa(first: Sequence[str | None], second: Sequence[str | None]) -> float | None:
    """Cohen's kappa between two labelings where both have an answer (``None`` without two classes)."""
    from sklearn.metrics import cohen_kappa_score

    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    if len({a for a, _ in pairs} | {b for _, b in pairs}) < 2:
        return None
    return float(cohen_kappa_score([a for a, _ in pairs], [b for _, b in pairs]))


def calibration(right: np.ndarray, confidence: Sequence[float | None], bins: int = 10) -> dict:
    """How far ``confidence`` can be taken at its word (gold only): expected calibration error over
    ``bins`` equal-width bins, and the accuracy of the most confident 50% and 80% of the answers
    (what a user keeping only those would get)."""
    known = np.asarray([c is not None for c in confidence])
    if not known.any():
        return {"ece": None, "top50_accuracy": None, "top80_accuracy": None, "n": 0}
    conf = np.asarray([c for c in confidence if c is not None], dtype=np.float64)
    hit = np.asarray(right, dtype=bool)[known]
    edges = np.linspace(0, 1, bins + 1)
    where = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = sum(
        abs(hit[where == b].mean() - conf[where == b].mean()) * (where == b).mean()
        for b in range(bins)
        if (where == b).any()
    )
    order = np.argsort(-conf, kind="stable")
    top = {
        f"top{int(share * 100)}_accuracy": float(hit[order[: max(1, round(share * len(conf)))]].mean())
        for share in (0.5, 0.8)
    }
    return {"ece": float(ece), **top, "n": len(conf)}


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")

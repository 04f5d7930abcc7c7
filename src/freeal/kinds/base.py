"""The contract between the loop and a kind of task (classification, NER, ...).

The loop (:mod:`freeal.loop`) owns the algorithm and the run folder; a :class:`TaskKind` says what
each step means for its kind: how its data is read, how the LLM is asked and its answers kept, what
an answer's *signature* is (the class used to balance the clean set and the demonstration pool),
how a re-asked answer merges with the earlier one, how the SLM is trained, and how answers are
scored against gold. A new kind (multi-label, relations) is a new subclass registered in
:mod:`freeal.kinds`, and nothing in the loop changes.

Answers are plain JSON values per item: a label for classification, a list of ``[type, start,
end]`` spans for NER; ``None`` where the LLM was not asked or gave no answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from freeal.config import Calibration, LoopConfig, SLMConfig
from freeal.llm.cache import CachedAnnotator
from freeal.structure import StructureVote
from freeal.tasks import Task

#: Item positions and the demonstrations (JSON rows of the kind) they are shown.
Group = tuple[np.ndarray, list[dict]]


@dataclass
class Answers:
    """One LLM pass over some items: per item its answer (``None`` = not asked or no answer),
    whether it was asked, extra per-item columns to keep (confidence, probabilities), per-group
    notes for ``groups.jsonl`` (calibration offsets), and the pass's numbers."""

    values: list[Any]
    asked: np.ndarray
    columns: dict[str, list[Any]] = field(default_factory=dict)
    group_notes: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


@dataclass
class SLMFit:
    """A trained SLM and what the loop needs of it, per training item: its prediction (an answer of
    the kind), confidence, whether it reproduces the LLM's answer, the clean/noisy split and the
    loss averaged over epochs (``NaN`` where the item had no answer to learn). With cross-fitting
    the prediction, confidence, agreement and probabilities come from models that did not train on
    the item. ``proba`` holds the probabilities as one (items × ``labels``) array, ``None`` for a kind
    without them: a dict per item would cost a quarter of a gigabyte at a million texts."""

    model: Any
    predicted: list[Any]
    confidence: np.ndarray
    agree: np.ndarray
    clean: np.ndarray
    clean_prob: np.ndarray
    mean_loss: np.ndarray
    epoch_log: list[dict]
    proba: np.ndarray | None = None
    labels: list[str] = field(default_factory=list)

    def probs(self, i: int) -> dict[str, float] | None:
        """Item ``i``'s probability per label (``None`` for a kind without them)."""
        if self.proba is None:
            return None
        return dict(zip(self.labels, map(float, self.proba[i]), strict=True))


class TaskKind(ABC):
    """How one kind of task meets the FreeAL loop (see the module docstring)."""

    #: the task's ``kind`` this class serves
    name: ClassVar[str]
    #: the field of ``labels.jsonl`` holding the answer (``label``, ``spans``)
    answer_key: ClassVar[str]
    #: what ``initial_demos: auto`` means for this kind (``generated`` or ``none``)
    initial_demos: ClassVar[str]
    #: what ``slm_weight`` unset means for this kind: the SLM's weight in the final labels
    slm_weight: ClassVar[float]
    #: what ``min_kappa`` unset means for this kind: the SLM-LLM agreement below which refinery
    #: asks no one and the final labels leave the SLM out
    min_kappa: ClassVar[float]
    #: whether :meth:`combine` weighs every round's answers (NER's vote) or the last round's only:
    #: the final step reads no more rounds than that (a round is two files of N rows)
    weighs_every_round: ClassVar[bool] = False
    #: what one item is called in messages
    unit: ClassVar[str]
    #: ``LoopConfig.deployed_mode`` when unset: how the SLM handed back trains
    deployed_mode: ClassVar[str]

    def __init__(self, task: Task) -> None:
        self.task = task

    def backbone(self, cfg: SLMConfig) -> str:
        """The SLM's encoder when the settings name none: MiniLM, small enough to fine-tune on a CPU."""
        return "all-minilm-l6-v2"

    def with_defaults(self, loop: LoopConfig) -> LoopConfig:
        """``loop`` with this kind's choices where it leaves them unset (``initial_demos: auto``,
        ``slm_weight``, ``min_kappa``, ``deployed_mode``), so a run's fingerprint and its plan name
        what runs."""
        unset = {
            "initial_demos": (loop.initial_demos == "auto", self.initial_demos),
            "slm_weight": (loop.slm_weight is None, self.slm_weight),
            "min_kappa": (loop.min_kappa is None, self.min_kappa),
            "deployed_mode": (loop.deployed_mode is None, self.deployed_mode),
        }
        return loop.model_copy(update={key: value for key, (pick, value) in unset.items() if pick})

    def with_backbone(self, cfg: SLMConfig) -> SLMConfig:
        """``cfg`` with its encoder named (:meth:`backbone` when it names none), so that a run's
        fingerprint, ``freeal train`` and the plan all see the encoder the SLM will use."""
        return cfg if cfg.backbone is not None else cfg.model_copy(update={"backbone": self.backbone(cfg)})

    def deployed_settings(self, slm: SLMConfig, loop: LoopConfig) -> SLMConfig:
        """The settings of the SLM handed back: the user's ``slm`` settings in ``loop``'s
        ``deployed_mode`` (this kind's when unset), with that mode's own pooling and, where the
        user named no encoder, this kind's encoder for it (:meth:`with_backbone`)."""
        from freeal.config import validate

        mode = loop.deployed_mode or self.deployed_mode
        if mode != slm.mode:
            fields = {**slm.model_dump(), "mode": mode, "pooling": None}
            slm = validate(SLMConfig, fields, "the deployed SLM")  # type: ignore[assignment]
        return self.with_backbone(slm)

    # -- data -------------------------------------------------------------------------------------
    @abstractmethod
    def read(self, data: Any, gold: Sequence[Any] | None) -> Any:
        """The input of ``fit`` as the kind's item container (``Items``, ``Sentences``)."""

    @abstractmethod
    def item_rows(self, items: Any) -> list[dict]:
        """What ``items.jsonl`` keeps of the input."""

    @abstractmethod
    def texts(self, items: Any) -> list[str]:
        """Each item as one string, for sentence embeddings."""

    # -- the LLM ----------------------------------------------------------------------------------
    @abstractmethod
    def write_demonstrations(
        self,
        annotator: CachedAnnotator,
        items: Any,
        loop: LoopConfig,
        calibrate: Calibration,
        progress: bool,
        say: Callable[[str], None],
    ) -> tuple[list[dict], dict]:
        """Demonstrations the LLM writes for the initial round (JSON rows), and the step's numbers."""

    @abstractmethod
    def demo_text(self, demo: dict) -> str:
        """A demonstration as text, for its embedding."""

    @abstractmethod
    def demonstration(self, items: Any, i: int, answer: Any) -> dict:
        """Item ``i`` with ``answer`` as a demonstration row (the feedback pool's members)."""

    @abstractmethod
    def signature(self, answer: Any) -> str | None:
        """The class of an answer for balancing (``None``: no answer)."""

    def pool_problem(self, pool: Sequence[dict]) -> str | None:
        """Why a demonstration pool must not be shown (then refinery asks no one), or ``None``."""
        return None

    @abstractmethod
    def ask(
        self,
        annotator: CachedAnnotator,
        items: Any,
        groups: Sequence[Group],
        *,
        calibrate: Calibration,
        progress: bool,
        description: str,
    ) -> Answers:
        """Ask the LLM about the items of ``groups``, each group with its demonstrations."""

    @abstractmethod
    def merge(self, old: dict, fresh: Answers, i: int, rule: str) -> dict:
        """Item ``i``'s answer fields after a refinery round: its ``old`` row's (``labels.jsonl``)
        where it was not asked or the LLM gave no answer (an abstention never erases a label), else
        the new answer combined with the old one by ``rule`` (``combined``/``new``). One row at a
        time, so that a round of a million rows streams from the last round's file to the next."""

    # -- the SLM ----------------------------------------------------------------------------------
    @abstractmethod
    def train(
        self, items: Any, answers: Sequence[Any], cfg: SLMConfig, on_epoch: Callable[[dict], None]
    ) -> SLMFit:
        """Train the SLM robustly on the answers (``None``: nothing to learn from that item)."""

    @abstractmethod
    def load_model(self, folder: Path, device: str) -> Any:
        """A model saved by the SLM step."""

    @abstractmethod
    def predict(self, model: Any, items: Any) -> list[Any]:
        """The model's answers on other items (the test set)."""

    def combine(
        self, items: Any, rounds: Sequence[tuple[list[dict], list[dict]]], slm_weight: float
    ) -> tuple[list[Any], list[Any]]:
        """Each item's final answer and its confidence, from every round's LLM rows and SLM
        predictions (``labels.jsonl``, ``predictions.jsonl``; oldest first, the last round last);
        ``slm_weight`` 0 means the LLM's last answers as they are. This default keeps them; a kind
        with more to weigh says how (classification: the SLM's held-out probabilities; NER: a vote
        of every round's opinions)."""
        rows = rounds[-1][0]
        return [r[self.answer_key] for r in rows], [r.get("confidence") for r in rows]

    def structure_vote(
        self, items: Any, rows: Sequence[dict], cfg: SLMConfig
    ) -> tuple[list[Any], list[float], StructureVote] | None:
        """Answers from the items' own structure, for final labels when the LLM's answers carry too
        little signal for the SLM to learn (kappa under ``min_kappa``; :mod:`freeal.structure`):
        each item's answer and confidence, and the vote itself, whose gold-free tests decide whether
        it is used. ``None``: this kind has no such vote (NER: an entity's type is already voted
        across the sentences where its mention recurs)."""
        return None

    @abstractmethod
    def corrected(self, row: dict, fix: dict) -> dict:
        """A final ``labels.jsonl`` row with a person's answer ``fix`` (as :mod:`freeal.export`
        reads it) in place of freeal's: that answer, confidence 1, clean."""

    # -- scoring (gold only) -----------------------------------------------------------------------
    @abstractmethod
    def score(self, gold: Sequence[Any], answers: Sequence[Any]) -> dict:
        """Metrics of ``answers`` against gold (accuracy, or entity P/R/F1)."""

    @abstractmethod
    def right(self, gold: Any, answer: Any) -> bool:
        """Whether one answer is entirely right."""

    # -- output -----------------------------------------------------------------------------------
    @abstractmethod
    def output(
        self, items: Any, rows: list[dict], fit_rows: list[dict], final: list[Any], confidence: list[Any]
    ) -> dict[str, list[Any]]:
        """The columns of the returned frame and ``labels.jsonl``, from the last round's rows, the
        last SLM's per-item predictions and the final answers with their confidence (:meth:`combine`)."""

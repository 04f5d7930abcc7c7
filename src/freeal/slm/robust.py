"""What both SLMs share: the robust self-training schedule and the saved-model layout.

The schedule is FreeAL's (DivideMix's): ``warmup_epochs`` of plain cross-entropy; then, before each
epoch, the labeled items' losses on the un-augmented input are split by a 2-component GMM into
clean and noisy (:mod:`freeal.slm.noise`), and the extra terms (mixup, consistency) are weighted
by a linear ramp over ``rampup_epochs``. The losses of every epoch after the first are kept: the
loss averaged over epochs (``mean_loss_``) ranks the clean set, since a mislabeled item is fitted
late, if at all, and its average stays high even once the network has memorised it.

A model is saved as its weights (tensors only, loaded with ``weights_only=True``, written to a
temporary file and renamed, so a kill never leaves half a model) and a JSON of what rebuilds it.
The classifier (:mod:`freeal.slm.classifier`) and the tagger (:mod:`freeal.slm.tagger`) say what an
item, a loss and an epoch's training are; this class says when each happens.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from freeal.config import SLMConfig
from freeal.data import write_text_atomic
from freeal.errors import FreeALError

M = TypeVar("M", bound="RobustTrainer")


class RobustTrainer(ABC):
    """The epoch loop and persistence of a robustly self-trained SLM (see the module docstring)."""

    #: file names of a saved model: its weights and the JSON that rebuilds it
    WEIGHTS: ClassVar[str]
    META: ClassVar[str]

    config: SLMConfig
    device: str
    net: nn.Module
    epoch_log: list[dict]

    # -- what a subclass says ------------------------------------------------------------------------
    @abstractmethod
    def _losses_now(self) -> Any:
        """The labeled items' current losses on the un-augmented input (eval mode)."""

    @abstractmethod
    def _item_losses(self, losses: Any) -> np.ndarray:
        """One loss per labeled item, for the average over epochs."""

    @abstractmethod
    def _split(self, losses: Any) -> None:
        """Mark the clean items from this epoch's losses."""

    @abstractmethod
    def _clean_fraction(self) -> float:
        """The share of labeled items marked clean."""

    @abstractmethod
    def _train_epoch(self, ramp: float) -> dict[str, float]:
        """One pass over the training items; the mean of each loss term."""

    @abstractmethod
    def _build(self) -> None:
        """Make ``net`` (and tokenizers) from the configuration."""

    @abstractmethod
    def _meta(self) -> dict:
        """What :meth:`load` needs to rebuild the model, as JSON."""

    @classmethod
    @abstractmethod
    def _from_meta(cls: type[M], meta: dict, device: str) -> M:
        """An untrained model as :meth:`_meta` described it."""

    # -- the schedule ---------------------------------------------------------------------------------
    def _run_epochs(self, on_epoch: Callable[[dict], None] | None) -> list[np.ndarray]:
        """Train ``config.epochs`` epochs; returns the per-item losses seen before each epoch after the
        first (for the average over epochs). ``on_epoch`` gets each epoch's log entry as it ends."""
        cfg = self.config
        self.epoch_log = []
        history: list[np.ndarray] = []
        for epoch in range(cfg.epochs):
            robust_now = cfg.robust and epoch >= cfg.warmup_epochs
            ramp = min(1.0, (epoch - cfg.warmup_epochs + 1) / cfg.rampup_epochs) if robust_now else 0.0
            if epoch > 0 or robust_now:
                losses = self._losses_now()
                if epoch > 0:  # epoch 0's losses come from an untrained model
                    history.append(self._item_losses(losses))
                if robust_now:
                    self._split(losses)
            start = time.perf_counter()
            totals = self._train_epoch(ramp)
            entry = {
                "epoch": epoch + 1,
                "clean_fraction": self._clean_fraction(),
                "ramp": ramp,
                **totals,
                "seconds": time.perf_counter() - start,
            }
            self.epoch_log.append(entry)
            if on_epoch is not None:
                on_epoch(entry)
        return history

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{self.WEIGHTS}.tmp"
        torch.save(self.net.state_dict(), tmp)
        tmp.replace(folder / self.WEIGHTS)
        write_text_atomic(folder / self.META, json.dumps(self._meta(), indent=2))

    @classmethod
    def load(cls: type[M], folder: str | Path, device: str = "auto") -> M:
        """A model saved by :meth:`save` (weights read as tensors only, never as code)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / cls.META).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FreeALError(f"{folder}: not a saved {cls.__name__} ({exc})") from exc
        model = cls._from_meta(meta, device)
        model._build()
        model.net.load_state_dict(
            torch.load(folder / cls.WEIGHTS, map_location=model.device, weights_only=True)
        )
        return model

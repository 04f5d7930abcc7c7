"""What both SLMs share: the robust self-training schedule and the saved-model layout.

The schedule is FreeAL's (DivideMix's): ``warmup_epochs`` of plain cross-entropy; then, before each
epoch, the labeled items' losses on the un-augmented input are split by a 2-component GMM into
clean and noisy (:mod:`freeal.slm.noise`), and the extra terms (mixup, consistency) are weighted
by a linear ramp over ``rampup_epochs``. The losses of every epoch after the first are kept: the
loss averaged over epochs (``mean_loss_``) ranks the clean set, since a mislabeled item is fitted
late, if at all, and its average stays high even once the network has memorised it.

The classifier can train in several processes, one per GPU, started by ``accelerate launch`` (or
``torchrun``): each process takes its share of every batch, the gradients are averaged across
processes before each step, so every process holds the same model, and the per-item loss passes are
split between processes and gathered. Alone (``WORLD_SIZE`` unset or 1) nothing of this runs.

A model is saved as its weights (tensors only, loaded with ``weights_only=True``, written to a
temporary file and renamed, so a kill never leaves half a model) and a JSON of what rebuilds it.
The classifier (:mod:`freeal.slm.classifier`) and the tagger (:mod:`freeal.slm.tagger`) say what an
item, a loss and an epoch's training are; this class says when each happens.
"""

from __future__ import annotations

import json
import os
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
from freeal.extras import require

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
    _optimizer: torch.optim.Optimizer
    #: this process's place among those training one model (``accelerate launch``); alone 0 of 1
    rank: int = 0
    world: int = 1

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

    # -- processes ----------------------------------------------------------------------------------
    def _join_processes(self) -> None:
        """Under ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) take this process's device and
        place among the others; alone, keep ``config.device``."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
        require("accelerate", what="training the SLM in several processes")
        from accelerate import PartialState

        state = PartialState(cpu=self.device == "cpu")
        self.device, self.rank, self.world = str(state.device), state.process_index, state.num_processes

    @property
    def main_process(self) -> bool:
        """Whether this process writes files (the first; always, when training alone)."""
        return self.rank == 0

    def _share(self, idx: np.ndarray) -> np.ndarray:
        """This process's part of a batch (the whole batch when training alone)."""
        return idx[self.rank :: self.world]

    def _step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``, with the gradients averaged across processes."""
        if self.world == 1 and not loss.requires_grad:
            return  # nothing in this batch to learn from
        self._optimizer.zero_grad()
        if loss.requires_grad:
            loss.backward()
        if self.world > 1:  # every process joins the average, also one whose share was empty
            from accelerate.utils import reduce

            params = [p for p in self.net.parameters() if p.requires_grad]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            flat = reduce(flat, reduction="mean")
            for p, grad in zip(params, flat.split([p.numel() for p in params]), strict=True):
                p.grad = grad.view_as(p).clone()
        self._optimizer.step()

    def _gathered(self, n: int, compute: Callable[[np.ndarray], torch.Tensor]) -> torch.Tensor:
        """``compute`` over items ``0..n-1``, split between the processes and gathered in order."""
        if self.world == 1:
            return compute(np.arange(n))
        from accelerate.utils import gather_object

        parts = gather_object([compute(np.array_split(np.arange(n), self.world)[self.rank])])
        return torch.cat(parts)

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

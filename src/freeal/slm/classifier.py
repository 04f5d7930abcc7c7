"""The small model (SLM): a sentence classifier that learns from noisy labels without believing them.

Robust self-training, as in FreeAL: a few warm-up epochs of cross-entropy on every labeled item; then,
each epoch, per-item losses on the un-augmented texts are split by a 2-component Gaussian mixture
into clean (low loss) and noisy items. Clean items are trained with cross-entropy plus mixup on their
hidden states; noisy items (and those the LLM abstained on) only through a consistency loss between a
text and its augmented view, so their given labels are never fitted. The extra terms ramp up linearly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from freeal.config import SLMConfig, validate
from freeal.embed import Embedder, encoder_path, torch_device
from freeal.errors import FreeALError
from freeal.slm.augment import make_views
from freeal.slm.losses import symmetric_kl
from freeal.slm.noise import split_clean
from freeal.slm.robust import RobustTrainer

log = logging.getLogger(__name__)


class _Net(nn.Module):
    """Encoder (absent in ``head`` mode, where inputs are cached embeddings) + a small MLP head."""

    def __init__(self, encoder: nn.Module | None, dim: int, n_classes: int, hidden: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Dropout(0.1), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_classes)
        )

    def hidden_states(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            assert isinstance(batch, torch.Tensor)
            return batch
        assert isinstance(batch, dict)
        out = self.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
        return (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def forward(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden_states(batch))


def checked_settings(
    labels: Sequence[str], config: SLMConfig | None, overrides: dict, modes: tuple[str, ...], who: str
) -> tuple[list[str], SLMConfig]:
    """A classifier SLM's label set and settings, validated like a config file (``model_copy(update=)``
    would take ``epochs=-1``); unset, the settings are ``modes[0]``'s defaults."""
    if not labels:
        raise FreeALError("the label set is empty")
    base = (config or SLMConfig(mode=modes[0])).model_dump()  # type: ignore[arg-type]
    checked: SLMConfig = validate(SLMConfig, {**base, **overrides}, who)  # type: ignore[assignment]
    if checked.mode not in modes:
        raise FreeALError(
            f"{who} trains mode {' or '.join(modes)}, not {checked.mode}: mode linear is "
            "freeal.slm.linear.LinearSLM, head and finetune freeal.slm.classifier.SLMClassifier"
        )
    return list(labels), checked


def label_indices(labels: Sequence[str | None], names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Each item's label as its index in ``names`` (-1 where None: abstained), and the names no item
    carries; a label outside the set, or no label at all, is one clear error."""
    index = {name: i for i, name in enumerate(names)}
    y = np.full(len(labels), -1, dtype=np.int64)
    for row, label in enumerate(labels):
        if label is None:
            continue
        if label not in index:
            raise FreeALError(f"item {row}: label {label!r} is not in the label set {list(names)}")
        y[row] = index[label]
    if (y < 0).all():
        raise FreeALError("no item has a label to learn from (all abstained)")
    return y, [names[c] for c in range(len(names)) if not (y == c).any()]


class SLMClassifier(RobustTrainer):
    """Sentence classifier trained robustly on noisy labels (scikit-learn style: ``fit``/``predict``).

    After :meth:`fit`, for the training items: ``train_proba_`` (predicted probabilities),
    ``train_loss_`` (cross-entropy against the given label after training; NaN where none),
    ``mean_loss_`` (the same averaged over the epochs: a mislabeled item is fitted late, if at all,
    so its mean stays high even once the network has memorized it), ``clean_prob_`` (the GMM
    posterior of a clean label, fitted on ``mean_loss_``; 0 where none) and ``clean_mask_``.
    """

    WEIGHTS = "model.pt"
    META = "slm.json"
    net: _Net

    def __init__(
        self,
        labels: Sequence[str],
        config: SLMConfig | None = None,
        *,
        embedder: Embedder | None = None,
        **overrides: object,
    ) -> None:
        self.labels, self.config = checked_settings(
            labels, config, overrides, ("head", "finetune"), "SLMClassifier"
        )
        self.device = torch_device(self.config.device)
        self.backbone = encoder_path(self.config.backbone)
        self.epoch_log: list[dict] = []
        # head mode: an embedder of this backbone to share (e.g. between cross-fitting folds)
        self._shared_embedder = embedder

    # -- inputs ---------------------------------------------------------------------------------
    def _build(self) -> None:
        self._join_processes()
        torch.manual_seed(self.config.seed)  # the same head in every process
        encoder = None
        if self.config.mode == "head":
            # the encoder's width read from its config file: importing transformers only for it took
            # 0.9 s of the SLM step's 1.7 s start when the embeddings come from the cache. Configs
            # that name it otherwise (DistilBERT's ``dim``) go through transformers' own mapping.
            dim = json.loads((Path(self.backbone) / "config.json").read_text()).get("hidden_size")
            if dim is None:
                from transformers import AutoConfig

                dim = AutoConfig.from_pretrained(self.backbone).hidden_size
            self._embedder = self._shared_embedder or Embedder(
                self.backbone, device=self.device, pooling=self.config.pooling or "sentence"
            )
        else:
            from transformers import AutoModel, AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.backbone)
            encoder = AutoModel.from_pretrained(
                self.backbone
            ).float()  # train in fp32 whatever the file holds
            dim = encoder.config.hidden_size
        self.net = _Net(encoder, dim, len(self.labels), self.config.hidden).to(self.device)

    def _inputs(self, texts: Sequence[str]) -> torch.Tensor | list[str]:
        """Head mode: the embeddings, computed once; finetune mode: the texts, tokenized per batch."""
        if self.config.mode == "head":
            vectors = self._embedder.encode(texts)
            # cached vectors are a read-only memory map of the file: copied; others are the model's own
            return torch.from_numpy(vectors if vectors.flags.writeable else np.array(vectors)).to(self.device)
        return list(texts)

    def _batch(
        self, source: torch.Tensor | list[str], idx: np.ndarray
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        if isinstance(source, torch.Tensor):
            return source[torch.as_tensor(idx, device=source.device)]
        enc = self._tokenizer(
            [source[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _logits(
        self, source: torch.Tensor | list[str], batch_size: int = 256, *, shared: bool = False
    ) -> torch.Tensor:
        """Logits of every item of ``source``; ``shared``: during ``fit``, split between processes."""

        def compute(items: np.ndarray) -> torch.Tensor:
            out = []
            with torch.no_grad():
                for start in range(0, len(items), batch_size):
                    out.append(self.net(self._batch(source, items[start : start + batch_size])).float().cpu())
            return torch.cat(out) if out else torch.empty(0, len(self.labels))

        self.net.eval()
        return self._gathered(len(source), compute) if shared else compute(np.arange(len(source)))

    # -- training -------------------------------------------------------------------------------
    def _targets(self, labels: Sequence[str | None]) -> np.ndarray:
        y, missing = label_indices(labels, self.labels)
        if missing:
            log.warning(
                "no labeled item for %s: only the consistency loss (lambda_u > 0) can teach it", missing
            )
        return y

    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[str | None],
        views: Sequence[str] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> SLMClassifier:
        """Train on ``texts`` with noisy ``labels`` (None = abstained); ``views`` are augmented texts.

        Without ``views``, a token-noise view (:func:`freeal.slm.augment.make_views`) is made per epoch
        in ``finetune`` mode, once in ``head`` mode (embeddings are computed once). ``on_epoch`` gets
        each epoch's entry of ``epoch_log`` (losses, clean fraction, seconds) as it ends.
        """
        if len(texts) != len(labels) or (views is not None and len(views) != len(texts)):
            raise FreeALError("texts, labels and views must have the same length")
        cfg = self.config
        y = self._targets(labels)
        self._build()
        self._texts = list(texts)
        self._views = views
        self._source = self._inputs(texts)
        # Views feed only the consistency loss: without it they are never needed.
        self._fixed_views = self._source
        if cfg.robust and cfg.lambda_u > 0:
            self._fixed_views = self._inputs(
                views if views is not None else make_views(self._texts, cfg.seed)
            )
        self._y = y
        self._y_t = torch.as_tensor(y, device=self.device)
        self._labeled = np.flatnonzero(y >= 0)
        head = cfg.mode == "head"
        self._batch_size = cfg.batch_size or (128 if head else 32)
        lr = cfg.lr or (3e-3 if head else 3e-5)
        # foreach: one kernel per step for all tensors, not one per tensor (torch's default on GPU
        # only); the same arithmetic, bit for bit, and the head's step on a CPU about 8% faster
        self._optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.01, foreach=True)
        self._beta = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha)
        self._rng = np.random.default_rng(cfg.seed)
        self._clean = np.zeros(len(texts), dtype=bool)
        self._clean[self._labeled] = True
        history = self._run_epochs(on_epoch)
        self._finish(self._source, y, history)
        del self._source, self._fixed_views, self._texts, self._views  # training inputs: n × d floats
        return self

    # -- the hooks of the robust schedule --------------------------------------------------------------
    def _losses_now(self) -> np.ndarray:
        """Cross-entropy of each labeled item against its given label, on the un-augmented input."""
        logits = self._logits(self._source, shared=True)[self._labeled]
        return F.cross_entropy(logits, torch.as_tensor(self._y[self._labeled]), reduction="none").numpy()

    def _item_losses(self, losses: np.ndarray) -> np.ndarray:
        return losses

    def _split(self, losses: np.ndarray) -> None:
        cfg = self.config
        groups = self._y[self._labeled] if cfg.split_per_class else None
        mask, _ = split_clean(losses, cfg.clean_threshold, cfg.seed, groups)
        self._clean[:] = False
        self._clean[self._labeled[mask]] = True

    def _clean_fraction(self) -> float:
        return float(self._clean[self._labeled].mean())

    def _train_epoch(self, ramp: float) -> dict[str, float]:
        cfg = self.config
        epoch = len(self.epoch_log)
        view = self._fixed_views
        if cfg.robust and cfg.lambda_u > 0 and cfg.mode == "finetune" and self._views is None and epoch > 0:
            view = make_views(self._texts, cfg.seed + epoch)
        used = np.arange(len(self._texts)) if ramp > 0 else self._labeled
        clean = self._clean
        self.net.train()
        order = self._rng.permutation(used)
        sums = {"loss": 0.0, "ce": 0.0, "mixup": 0.0, "consistency": 0.0}
        steps = 0
        for start in range(0, len(order), self._batch_size):
            idx = self._share(order[start : start + self._batch_size])
            c_idx, n_idx = idx[clean[idx]], idx[~clean[idx]]
            loss = self._batch_loss(c_idx, n_idx, view, ramp, sums)
            self._step(loss)
            sums["loss"] += loss.item()
            steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def _batch_loss(
        self, c_idx: np.ndarray, n_idx: np.ndarray, view: torch.Tensor | list[str], ramp: float, sums: dict
    ) -> torch.Tensor:
        """Cross-entropy (+ mixup) on a batch's clean items, consistency on its noisy ones."""
        cfg = self.config
        source, y_t, beta = self._source, self._y_t, self._beta
        loss = torch.zeros((), device=self.device)
        if len(c_idx):
            hidden = self.net.hidden_states(self._batch(source, c_idx))
            target = y_t[torch.as_tensor(c_idx, device=self.device)]
            ce = F.cross_entropy(self.net.head(hidden), target)
            loss = loss + ce
            sums["ce"] += ce.item()
            if ramp > 0 and len(c_idx) > 1 and cfg.mixup_weight > 0:
                lam = float(beta.sample())
                lam = max(lam, 1 - lam)
                perm = torch.randperm(len(c_idx), device=self.device)
                onehot = F.one_hot(target, len(self.labels)).float()
                mixed = self.net.head(lam * hidden + (1 - lam) * hidden[perm])
                mix_target = lam * onehot + (1 - lam) * onehot[perm]
                mix = -(mix_target * F.log_softmax(mixed, 1)).sum(1).mean()
                loss = loss + ramp * cfg.mixup_weight * mix
                sums["mixup"] += mix.item()
        if ramp > 0 and len(n_idx) and cfg.lambda_u > 0:
            cons = symmetric_kl(
                self.net(self._batch(source, n_idx)),
                self.net(self._batch(view, n_idx)),
                cfg.sharpen_temperature,
            )
            loss = loss + ramp * cfg.lambda_u * cons
            sums["consistency"] += cons.item()
        return loss

    def _finish(self, source: torch.Tensor | list[str], y: np.ndarray, history: list[np.ndarray]) -> None:
        """Per-item predictions, losses and the final clean/noisy split on the training items."""
        logits = self._logits(source, shared=True)
        self.train_proba_ = F.softmax(logits, 1).numpy()
        labeled = np.flatnonzero(y >= 0)
        final = F.cross_entropy(logits[labeled], torch.as_tensor(y[labeled]), reduction="none").numpy()
        self.train_loss_ = np.full(len(y), np.nan)
        self.train_loss_[labeled] = final
        self.mean_loss_ = np.full(len(y), np.nan)
        self.mean_loss_[labeled] = np.mean([*history, final], axis=0)
        self.clean_prob_ = np.zeros(len(y))
        groups = y[labeled] if self.config.split_per_class else None
        # split on the loss averaged over epochs: by the last epoch the network has memorised many
        # wrong labels, and their last loss no longer tells them apart (BENCHMARKS.md)
        mask, prob = split_clean(
            self.mean_loss_[labeled], self.config.clean_threshold, self.config.seed, groups
        )
        self.clean_prob_[labeled] = prob
        self.clean_mask_ = np.zeros(len(y), dtype=bool)
        self.clean_mask_[labeled] = mask

    # -- prediction and persistence -------------------------------------------------------------
    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        if not hasattr(self, "net"):
            raise FreeALError("the SLM is not trained: call fit() or load() first")
        return F.softmax(self._logits(self._inputs(texts)), 1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.predict_proba(texts).argmax(1)]

    def _meta(self) -> dict:
        return {"labels": self.labels, "config": self.config.model_dump(), "backbone": self.backbone}

    @classmethod
    def _from_meta(cls, meta: dict, device: str) -> SLMClassifier:
        return cls(
            meta["labels"], SLMConfig(**{**meta["config"], "backbone": meta["backbone"], "device": device})
        )

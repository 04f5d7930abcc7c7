"""The token-level SLM: a fine-tuned encoder tagging IOB2, trained robustly on the LLM's entity spans.

FreeAL gives no code for token tasks; the choices here, and why:

- **Unit of the clean/noisy split**: configurable (``split_unit``), ``sentence`` by default. Each
  epoch after warm-up a 2-component GMM on the per-sentence mean token loss (or, with ``token``,
  on the per-token losses) marks clean sentences (tokens); only those are trained with
  cross-entropy. The LLM's errors on NER are whole missed or extra entities, and the loop re-asks
  whole sentences, so the sentence is the natural unit; BENCHMARKS.md compares both on BC5CDR.
- **Mixup is not used**: mixing the hidden states of two sentences token by token pairs unrelated
  tokens of different lengths, which has no meaning for tagging.
- **Consistency** (``lambda_u`` > 0): on noisy sentences, a symmetric KL between the token
  distributions of two dropout-noised passes of the same sentence; text-level augmentation would
  move tokens and break the token alignment. Off by default, as for classification.

Only the first sub-word of each word carries a tag (the others are ignored in the loss and read
from the first at prediction).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from freeal.config import SLMConfig
from freeal.embed import encoder_path, torch_device
from freeal.errors import FreeALError
from freeal.ner import check_tag_rows, repair_tags, tag_names, tag_signatures
from freeal.slm.losses import symmetric_kl
from freeal.slm.noise import split_clean
from freeal.slm.robust import RobustTrainer


class _TagNet(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, n_tags: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(dim, n_tags))

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.encoder(**batch).last_hidden_state)


class SLMTagger(RobustTrainer):
    """Token tagger over an entity-type list (scikit-learn style: ``fit`` / ``predict``).

    After :meth:`fit`, for the training sentences: ``train_tags_`` (predicted tags),
    ``train_confidence_`` (mean over words of the top tag probability), ``mean_loss_`` (mean token
    loss against the given tags, averaged over epochs; NaN where unlabeled), ``clean_prob_`` and
    ``clean_mask_`` (sentence level, split on the last epoch's loss: with ``split_unit='token'`` a
    sentence is clean when all its tokens are).
    """

    WEIGHTS = "weights.pt"
    META = "tagger.json"

    def __init__(self, types: Sequence[str], config: SLMConfig | None = None) -> None:
        if not types:
            raise FreeALError("the tagger needs at least one entity type")
        self.types = list(types)
        self.tags = tag_names(self.types)
        self.config = config or SLMConfig()
        self.split_unit = self.config.split_unit
        self.device = torch_device(self.config.device)

    def _build(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        torch.manual_seed(self.config.seed)
        path = encoder_path(self.config.backbone)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not self.tokenizer.is_fast:
            raise FreeALError(f"{path}: token tagging needs a fast tokenizer (word alignment)")
        encoder = AutoModel.from_pretrained(path)
        self.net = _TagNet(encoder, encoder.config.hidden_size, len(self.tags)).to(self.device)
        self.backbone = path

    def _subwords(self, sentences: Sequence[Sequence[str]], **kwargs: Any) -> Any:
        """The tokenizer's encoding of word-split sentences, cut where the encoder cuts them: the
        training batches are sorted by these lengths, and must see what the encoder sees."""
        return self.tokenizer(
            [list(s) for s in sentences],
            is_split_into_words=True,
            truncation=True,
            max_length=self.config.max_length * 2,
            **kwargs,
        )

    def _encode(self, sentences: Sequence[Sequence[str]]) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Sub-word inputs and, per sentence, the position of each word's first sub-word (-1 where
        the word was cut off by ``max_length``)."""
        enc = self._subwords(sentences, padding=True, return_tensors="pt")
        firsts = []
        for b, words in enumerate(sentences):
            first = [-1] * len(words)
            for pos, w in enumerate(enc.word_ids(b)):
                if w is not None and first[w] == -1:
                    first[w] = pos
            firsts.append(first)
        return {k: v.to(self.device) for k, v in enc.items()}, firsts

    def _targets(
        self, tags: Sequence[Sequence[str]] | None, firsts: list[list[int]], width: int
    ) -> torch.Tensor:
        index = {t: i for i, t in enumerate(self.tags)}
        y = torch.full((len(firsts), width), -100, dtype=torch.long)
        if tags is None:
            return y.to(self.device)
        for b, (first, row) in enumerate(zip(firsts, tags, strict=True)):
            for pos, tag in zip(first, row, strict=True):
                if pos >= 0:
                    y[b, pos] = index[tag]
        return y.to(self.device)

    def _losses(self, sentences: list[list[str]], tags: list[list[str]]) -> list[np.ndarray]:
        """Per-word cross-entropy against the given tags, un-augmented (eval mode)."""
        self.net.eval()
        out: list[np.ndarray] = [np.empty(0)] * len(sentences)
        with torch.no_grad():
            for idx in _by_length(sentences):
                batch, firsts = self._encode([sentences[i] for i in idx])
                logits = self.net(batch)
                y = self._targets([tags[i] for i in idx], firsts, logits.shape[1])
                loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="none", ignore_index=-100)
                for b, (i, first) in enumerate(zip(idx, firsts, strict=True)):
                    out[i] = np.asarray([loss[b, p].item() for p in first if p >= 0])
        return out

    def fit(
        self,
        sentences: Sequence[Sequence[str]],
        tags: Sequence[Sequence[str] | None],
        on_epoch: Callable[[dict], None] | None = None,
    ) -> SLMTagger:
        """Train on ``sentences`` (token lists) with noisy IOB2 ``tags`` (``None`` = no annotation:
        such sentences take part only in the consistency loss).

        With ``split_per_class`` (default) the sentence-level mixture is fitted per *signature* of
        the given tags (which types a sentence holds): a sentence without entities has a tiny mean
        loss, and one mixture over all sentences would call nearly every sentence with an entity
        noisy (on a 30-sentence BC5CDR smoke run it flagged 90% of them)."""
        check_tag_rows(sentences, tags, self.tags)
        cfg = self.config
        self._build()
        words = [list(s) for s in sentences]
        labeled = np.asarray([i for i, t in enumerate(tags) if t is not None], dtype=np.int64)
        if len(labeled) == 0:
            raise FreeALError("no sentence has tags: the tagger has nothing to learn from")
        given = [list(t) if t is not None else ["O"] * len(w) for t, w in zip(tags, words, strict=True)]
        self._words, self._given, self._labeled = words, given, labeled
        self._lengths = [len(ids) for ids in self._subwords(words)["input_ids"]]
        self._optimizer = torch.optim.AdamW(
            self.net.parameters(),
            lr=cfg.lr or 1e-4,
            weight_decay=0.01,
            foreach=True,  # see SLMClassifier
        )
        self._rng = np.random.default_rng(cfg.seed)
        self._token_clean: list[np.ndarray] = [np.ones(len(w), dtype=bool) for w in words]
        self._sentence_clean = np.zeros(len(words), dtype=bool)
        self._sentence_clean[labeled] = True
        self._groups = tag_signatures([given[i] for i in labeled]) if cfg.split_per_class else None
        history = self._run_epochs(on_epoch)
        self._finish(words, given, labeled, history)
        return self

    # -- the hooks of the robust schedule --------------------------------------------------------------
    def _losses_now(self) -> list[np.ndarray]:
        return self._losses([self._words[i] for i in self._labeled], [self._given[i] for i in self._labeled])

    def _item_losses(self, losses: list[np.ndarray]) -> np.ndarray:
        return np.asarray([x.mean() if len(x) else 0.0 for x in losses])

    def _split(self, losses: list[np.ndarray]) -> None:
        cfg = self.config
        self._sentence_clean[:] = False
        self._token_clean = [np.zeros(len(w), dtype=bool) for w in self._words]
        if self.split_unit == "sentence":
            mask, _ = split_clean(self._item_losses(losses), cfg.clean_threshold, cfg.seed, self._groups)
            for i, m in zip(self._labeled, mask, strict=True):
                self._sentence_clean[i] = m
                self._token_clean[i][:] = m
        else:
            flat = np.concatenate(losses)
            mask, _ = split_clean(flat, cfg.clean_threshold, cfg.seed)
            cut = np.cumsum([len(x) for x in losses])[:-1]
            for i, m in zip(self._labeled, np.split(mask, cut), strict=True):
                self._token_clean[i][: len(m)] = m
                self._sentence_clean[i] = bool(m.all())

    def _clean_fraction(self) -> float:
        return float(self._sentence_clean[self._labeled].mean())

    def _train_epoch(self, ramp: float) -> dict[str, float]:
        words, given, labeled, token_clean, sentence_clean, rng = (
            self._words, self._given, self._labeled, self._token_clean, self._sentence_clean, self._rng,
        )  # fmt: skip
        cfg = self.config
        self.net.train()
        used = np.arange(len(words)) if ramp > 0 and cfg.lambda_u > 0 else labeled
        sums = {"loss": 0.0, "ce": 0.0, "consistency": 0.0}
        steps = 0
        is_labeled = np.zeros(len(words), dtype=bool)
        is_labeled[labeled] = True
        for idx in similar_length_batches(used, self._lengths, cfg.batch_size or 32, rng):
            batch, firsts = self._encode([words[i] for i in idx])
            logits = self.net(batch)
            y = self._targets([given[i] for i in idx], firsts, logits.shape[1])
            for b, i in enumerate(idx):  # only clean words of labeled sentences are fitted
                for k, pos in enumerate(firsts[b]):
                    if pos >= 0 and not (is_labeled[i] and token_clean[i][k]):
                        y[b, pos] = -100
            loss = torch.zeros((), device=self.device)
            if (y >= 0).any():
                ce = F.cross_entropy(logits.transpose(1, 2), y, ignore_index=-100)
                loss = loss + ce
                sums["ce"] += ce.item()
            noisy = [b for b, i in enumerate(idx) if not sentence_clean[i]]
            if ramp > 0 and cfg.lambda_u > 0 and noisy:
                mask = batch["attention_mask"][noisy].bool()
                again = self.net({k: v[noisy] for k, v in batch.items()})
                cons = symmetric_kl(logits[noisy][mask], again[mask], cfg.sharpen_temperature)
                loss = loss + ramp * cfg.lambda_u * cons
                sums["consistency"] += cons.item()
            self._step(loss)
            sums["loss"] += loss.item()
            steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def _finish(
        self, words: list[list[str]], given: list[list[str]], labeled: np.ndarray, history: list[np.ndarray]
    ) -> None:
        self.train_tags_, self.train_confidence_ = self._predict(words)
        losses = self._losses([words[i] for i in labeled], [given[i] for i in labeled])
        final = np.asarray([x.mean() if len(x) else 0.0 for x in losses])
        self.mean_loss_ = np.full(len(words), np.nan)
        self.mean_loss_[labeled] = np.mean([*history, final], axis=0)
        self.clean_prob_ = np.zeros(len(words))
        self.clean_mask_ = np.zeros(len(words), dtype=bool)
        if self.split_unit == "sentence":
            # on the last epoch's loss, unlike the classifier: measured on 300 BC5CDR sentences with
            # 40% corrupted, the epoch-averaged loss split no better at 10 epochs and worse at 5
            # (clean side 73.7% right against 79.6%), its early epochs being noise (BENCHMARKS.md)
            mask, prob = split_clean(final, self.config.clean_threshold, self.config.seed, self._groups)
        else:
            flat_mask, flat_prob = split_clean(
                np.concatenate(losses), self.config.clean_threshold, self.config.seed
            )
            cut = np.cumsum([len(x) for x in losses])[:-1]
            mask = np.asarray([m.all() for m in np.split(flat_mask, cut)])
            prob = np.asarray([p.min() if len(p) else 1.0 for p in np.split(flat_prob, cut)])
        self.clean_mask_[labeled] = mask
        self.clean_prob_[labeled] = prob

    def _predict(self, sentences: Sequence[Sequence[str]]) -> tuple[list[list[str]], np.ndarray]:
        self.net.eval()
        out: list[list[str]] = [[] for _ in sentences]
        confidence = np.ones(len(sentences))
        with torch.no_grad():
            for idx in _by_length(sentences):
                batch, firsts = self._encode([list(sentences[i]) for i in idx])
                proba = F.softmax(self.net(batch), -1).cpu().numpy()
                for b, (i, first) in enumerate(zip(idx, firsts, strict=True)):
                    rows = [proba[b, p] if p >= 0 else None for p in first]
                    out[i] = repair_tags([self.tags[int(r.argmax())] if r is not None else "O" for r in rows])
                    tops = [float(r.max()) for r in rows if r is not None]
                    confidence[i] = float(np.mean(tops)) if tops else 1.0
        return out, confidence

    def predict(self, sentences: Sequence[Sequence[str]]) -> list[list[str]]:
        """IOB2 tags per sentence (an ``I-`` that continues nothing becomes ``B-``)."""
        if not hasattr(self, "net"):
            raise FreeALError("the tagger is not trained: call fit() or load() first")
        return self._predict(sentences)[0]

    def _meta(self) -> dict:
        return {
            "types": self.types,
            "split_unit": self.split_unit,
            "config": self.config.model_dump(mode="json"),
            "backbone": self.backbone,
        }

    @classmethod
    def _from_meta(cls, meta: dict, device: str) -> SLMTagger:
        saved = {"device": device, "backbone": meta["backbone"], "split_unit": meta["split_unit"]}
        return cls(meta["types"], SLMConfig(**{**meta["config"], **saved}))


def _by_length(sentences: Sequence[Sequence[str]], size: int = 64) -> Iterator[list[int]]:
    """Positions of ``sentences`` in batches of ``size``, shortest sentences first. A batch pads to
    its longest sentence, so batching by length spares the encoder most of its padding where
    nothing depends on which sentences share a batch (losses and predictions, not training)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    for start in range(0, len(order), size):
        yield order[start : start + size]


def similar_length_batches(
    used: np.ndarray, lengths: Sequence[int], size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """A training epoch's batches of ``size``: random, but each drawn from a random window of
    ``8 * size`` sentences sorted by ``lengths`` (sub-words), the batches then shuffled. A batch
    pads to its longest sentence, and BC5CDR's run from a few words to past the 128-sub-word cut:
    random batches put 2.1-2.6 times the sentences' own sub-words through the encoder, these about
    1.3 times (300 train sentences, batches of 16 and 32), and which sentences meet in a batch stays
    random but for their length."""
    order = rng.permutation(used)
    batches: list[np.ndarray] = []
    for start in range(0, len(order), 8 * size):
        window = sorted(order[start : start + 8 * size], key=lambda i: lengths[i])
        batches.extend(np.asarray(window[k : k + size]) for k in range(0, len(window), size))
    for b in rng.permutation(len(batches)):
        yield batches[b]

"""Configuration as plain, validated data.

Every knob a user can set lives in a pydantic model with ``extra="forbid"``, so a misspelt key or a
bad value is reported before any work starts, naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from freeal.errors import FreeALError

Calibration = Literal["auto", "on", "off"]

#: How a text becomes one vector. ``sentence``: the encoder's own sentence embedding (for the
#: shipped encoders, the mean of the last layer's token states), what it was trained to output and
#: what retrieval wants. ``layers``: the mean of the token states of every layer, averaged over the
#: layers: features for a classifier head, since the sentence objective (texts about the same thing
#: close together) flattens what a label may hang on, such as polarity (BENCHMARKS.md, "Features
#: for the SLM's head").
Pooling = Literal["sentence", "layers"]


def cache_root() -> Path:
    """Where assembled models and cached LLM answers live: ``$FREEAL_CACHE_DIR`` or ``~/.cache/freeal``."""
    return Path(os.environ.get("FREEAL_CACHE_DIR") or Path.home() / ".cache" / "freeal")


class Endpoint(BaseModel):
    """One OpenAI-compatible server and the environment variable holding its key.

    Each server or key has its own quota (a local vLLM takes many requests at once, a provider's key
    so many per minute), so an endpoint may carry its own ``max_concurrency``,
    ``requests_per_minute`` (``rpm``) and ``tokens_per_minute`` (``tpm``); unset, a limit is the
    :class:`LLMConfig`-wide one. Limits change no answer, so they are in neither the answer cache's
    key nor a run's fingerprint.
    """

    model_config = ConfigDict(extra="forbid")

    base_url: str = Field(min_length=1)
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int | None = Field(default=None, ge=1)
    requests_per_minute: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("requests_per_minute", "rpm")
    )
    tokens_per_minute: float | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("tokens_per_minute", "tpm")
    )


class LLMConfig(BaseModel):
    """Which annotator to use and how to run it.

    ``calibrate``: contextual calibration ``on``, ``off``, or ``auto`` (decided per data set without
    gold labels: see :func:`freeal.annotate.choose_calibration`).
    ``max_concurrency``, ``requests_per_minute`` and ``tokens_per_minute`` bound each OpenAI-compatible
    endpoint; an entry of ``endpoints`` may set its own (:class:`Endpoint`).
    """

    model_config = ConfigDict(extra="forbid")

    backend: Literal["llamacpp", "openai"] = "llamacpp"
    model: str = "qwen2.5-coder-1.5b"
    calibrate: Calibration = "auto"
    # llama.cpp
    n_threads: int | None = Field(default=None, ge=1)
    n_ctx: int = Field(default=4096, ge=256)
    # text tokens label scoring puts in one llama.cpp batch (many texts per decode; the CPU kernels
    # run fastest on batches of a few hundred tokens)
    batch_tokens: int = Field(default=512, ge=32, le=4096)
    # llama.cpp's repacked weight buffers: auto = off on CPUs with AMX (they segfault there)
    extra_buffers: Literal["auto", "on", "off"] = "auto"
    # OpenAI-compatible servers
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    # several servers (or keys) used at once, instead of base_url/api_key_env
    endpoints: list[Endpoint] | None = Field(default=None, min_length=1)
    max_concurrency: int = Field(default=8, ge=1)
    requests_per_minute: float | None = Field(default=None, gt=0)
    tokens_per_minute: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=5, ge=0)
    timeout: float = Field(default=60.0, gt=0)
    # send an API key over plain http to a host other than this machine (off: refused)
    allow_plain_http: bool = False
    # where answers are cached; default: $FREEAL_CACHE_DIR or ~/.cache/freeal
    cache_path: Path | None = None

    @field_validator("calibrate", "extra_buffers", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        """YAML reads a bare ``on``/``off`` as a boolean; take it as the word the user wrote."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], raw: dict, source: str) -> M:
    """Validate ``raw`` against ``model``; the error names ``source``, the key and the problem."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise FreeALError(f"{source}: {where}: {first['msg']}") from exc


class SLMConfig(BaseModel):
    """The small model and its robust self-training (defaults follow FreeAL/DivideMix where they exist).

    ``backbone``: ``all-minilm-l6-v2``, ``all-mpnet-base-v2`` (from its PyPI packages; 6× slower
    to embed) or a local encoder folder. Unset, the loop picks per kind: ``all-mpnet-base-v2`` for
    a classifier in ``head`` mode (0.847 against MiniLM's 0.743 on the MR test set with gpt-3.5
    labels, BENCHMARKS.md) and for ``finetune`` on a GPU (0.892 against 0.836 on that test set,
    21 s per epoch on an H100) and for the linear SLMs (classifier and tagger), ``all-minilm-l6-v2``
    for ``finetune`` on a CPU and for the fine-tuned NER tagger, where a larger encoder costs far
    more per step.
    ``mode``: ``head`` trains a small head on frozen, cached sentence embeddings with the robust
    schedule (fast on a CPU); ``linear`` fits a logistic regression on frozen layer means in seconds
    (:mod:`freeal.slm.linear`; what the loop hands back on a CPU, ``LoopConfig.deployed_mode``);
    ``finetune`` trains the whole encoder with the head, as in the paper. ``batch_size`` and ``lr``
    default per mode: 128 and 3e-3 for a head on cached embeddings (as accurate as 32 and 1e-3 on
    the quality slices and about twice as fast, BENCHMARKS.md), 32 and 3e-5 when the encoder trains
    (the NER tagger: 32 and 1e-4).
    ``pooling``: the vectors a frozen-encoder SLM (``linear``, ``head``) learns from, ``layers``
    (every layer's token mean, averaged over the layers) or ``sentence`` (the encoder's sentence
    embedding); unset, ``layers`` for ``linear`` and ``sentence`` for ``head``, as measured
    (:data:`Pooling`; BENCHMARKS.md, "Features for the SLM's head").
    ``lambda_u`` weighs the consistency loss on noisy items. It defaults to 0 (noisy items are left
    out): with real LLM labels on MR, SST-2 and TREC the consistency term lowered test accuracy,
    while it helped under synthetic uniform noise (BENCHMARKS.md); set 1.0 for the paper's setting.
    For NER the tagger is ``finetune`` (also for ``head``, which a tagger does not have; then
    ``split_unit`` says whether the GMM splits sentences, by mean token loss, or tokens) or
    ``linear``; mixup does not apply.
    ``cross_fit``: the SLM's opinion of each item comes from a model that did not train on it
    (``cross_fit`` folds, each predicted by a model trained on the others), so it can disagree
    with a label it would otherwise memorise; 0 takes the trained model's own predictions. The
    classifier and the linear tagger only: five more fine-tunings of a tagger per round cost too
    much on a CPU.
    Under ``accelerate launch`` the SLM trains in one process per GPU (README, "More than one GPU").
    """

    model_config = ConfigDict(extra="forbid")

    backbone: str | None = None
    mode: Literal["head", "linear", "finetune"] = "head"
    pooling: Pooling | None = None
    robust: bool = True
    epochs: int = Field(default=10, ge=1)
    warmup_epochs: int = Field(default=2, ge=0)
    batch_size: int | None = Field(default=None, ge=2)
    lr: float | None = Field(default=None, gt=0)
    max_length: int = Field(default=64, ge=8)
    hidden: int = Field(default=256, ge=1)
    clean_threshold: float = Field(default=0.7, gt=0, lt=1)
    split_per_class: bool = True
    mixup_alpha: float = Field(default=4.0, gt=0)
    mixup_weight: float = Field(default=1.0, ge=0)
    lambda_u: float = Field(default=0.0, ge=0)
    rampup_epochs: int = Field(default=3, ge=1)
    sharpen_temperature: float = Field(default=0.5, gt=0)
    split_unit: Literal["sentence", "token"] = "sentence"
    cross_fit: int = Field(default=5, ge=0)
    device: str = "auto"
    seed: int = 0

    @field_validator("cross_fit")
    @classmethod
    def _folds(cls, value: int) -> int:
        if value == 1:
            raise ValueError("cross_fit needs 2 or more folds (0: off)")
        return value

    @model_validator(mode="after")
    def _pooling(self) -> SLMConfig:
        """Unset pooling named per frozen mode, so the fingerprint and a saved model say which: a
        model saved before the setting existed was a ``head`` on sentence vectors, and loads so."""
        if self.pooling is None and self.mode != "finetune":
            self.pooling = "layers" if self.mode == "linear" else "sentence"
        return self


class LoopConfig(BaseModel):
    """The FreeAL loop: demonstration writing, rounds, and how demonstrations reach the prompts.

    ``group_size``: items clustered into groups of about this size share their demonstrations (the
    ones nearest to the group's centroid), so llama.cpp evaluates them once per group; ``null`` gives
    each item its own ``k`` nearest, as in the paper (much slower on an embedded model).
    ``refined_label``: for a text asked again, ``new`` takes the refinery answer (the paper);
    ``combined`` takes the label that the two answers (earlier and refinery) together make most
    probable (product of their probabilities), so a label changes only when the new prompt outweighs
    the old one. On issue 12's 9 slices (refinery round 1, replayed from the runs' answers) ``new``
    gained 0.6 points on SST-2, was level on MR and lost 5.4 on TREC, where the refinery answers
    are worse than the zero-shot ones on too many texts (BENCHMARKS.md).
    ``min_change``: stop early when a refinery round changes fewer than this share of labels. On
    issue 12's 9 slices a round that changed under 2% was followed by one that changed about half as
    many and gained nothing (SST-2 and MR: round 1 changed 1.2-1.9%, and stopping after it ended
    +0.2 and +0.3 points above a second round, within the spread), while TREC's rounds changed
    2.3-6.1% and its second round added +0.3; so 2.5% skips the sentiment sets' second round (11-13%
    of the run's time) and keeps TREC's (BENCHMARKS.md, "The single-slice knobs on the 9 slices").
    ``initial_demos``: ``generated`` (the paper: the LLM writes demonstrations for the initial round)
    or ``none`` (the initial round is zero-shot; demonstrations come only from the SLM's pool);
    ``auto`` (default) is ``none``, for both kinds: with the embedded model the written
    demonstrations made the initial round worse than zero-shot on SST-2 (0.841 against 0.893 on
    1,000 texts), MR, TREC and the README's demo, and lowered BC5CDR F1 on one of two slices by
    8.7 points (BENCHMARKS.md); ``generated`` is the paper's start (its preset in ``bench/``).
    ``max_calls_per_label``: calls allowed to fill a label's quota (default: twice the calls needed).
    ``verify_demos``: check written demonstrations as they are written: keep only those the LLM
    labels, zero-shot, as intended (NER: add the entities it finds zero-shot), and write until those
    fill the quota.
    ``zero_shot_baseline``: also label everything zero-shot, for comparison only (one extra pass).
    ``refine``: which items refinery asks again: ``noisy`` (the paper: those the SLM's loss split
    calls noisy) or ``disagree`` (those whose SLM prediction, held out when cross-fitted, differs
    from the LLM's answer).
    ``final_label``: ``combined`` (the LLM's answers weighed with the SLM's: for a classifier the
    label the LLM's and the SLM's probabilities make most probable together, the SLM's raised to
    ``slm_weight``, its probability the confidence; for NER a vote of every round's entity lists,
    each tagger prediction weighing ``slm_weight`` against the LLM's 1) or ``llm`` (the LLM's last
    answer, the paper). ``slm_weight`` unset: per kind (classification 0.5, NER 2; BENCHMARKS.md).
    ``min_kappa``: the loop stops after the feedback step (no refinery round) when the SLM's
    (held-out) predictions agree with the LLM's answers less than this Cohen's kappa: the SLM is
    then too weak to tell right answers from wrong ones (too few texts for its classes), or the
    answers carry too little signal to learn, so its clean set would be a guess and demonstrations
    drawn from it would feed the LLM its own errors.
    The final labels then leave the SLM out too (the LLM's answers alone). Unset: per kind
    (classification 0.6: under it refinery and the SLM's vote cost TREC 2.8 points on 13 slices of
    300 and 500 texts, and a near-chance annotator's SLM 2.4 on SST-2; NER 0.2; BENCHMARKS.md).
    ``weak_labels``: the final labels when the SLM reproduces the LLM's last answers under
    ``min_kappa``: ``structure`` (a classifier's texts take the label their clusters lean to, the
    LLM's probabilities averaged within k-means clusters of the SLM encoder's vectors, when that
    vote predicts the LLM's most distinctive answers held out with a kappa of at least 0.5 and
    agrees with its labels at large under 0.2; else the LLM's answers) or ``llm`` (the LLM's
    answers alone). With SmolLM2-135M as the annotator the vote took SST-2 and MR from 0.51-0.58
    to 0.76-0.84 and declined TREC, where it would have lost (:mod:`freeal.structure`,
    BENCHMARKS.md). NER has no such vote.
    ``deployed_slm``: the SLM handed back (``slm_``): ``final_labels`` trains it once more on the
    final labels (``final/slm``; one more SLM training, skipped when they are the last round's
    answers), ``last_round`` keeps the last round's, which learned the LLM's last answers. On the
    BC5CDR slices the retrained tagger tested +1.4, +12.7 and -1.1 entity F1; on 9 classification
    slices the two were level (+0.3 points on each data set's mean, -1.6 to +2.0 per slice; 2-4 s
    more per 1,000 texts in ``head`` mode), and the model handed back is then the one that learned
    the labels handed back (BENCHMARKS.md).
    ``deployed_mode``: the ``SLMConfig.mode`` of that retrained SLM; unset, per kind: ``linear``
    for a classifier, a logistic regression on the encoder's frozen layer means, 1.2 (SST-2) and
    1.9 (MR) points below the final labels on the test sets where the ``head`` was 3.7 and 4.0
    below, while the loop's own SLM stays the ``head`` that chooses what refinery asks (with the
    linear SLM there, refinery fixed fewer labels and broke more: TREC ended below zero-shot);
    ``linear`` for NER too, a logistic regression per word, level in entity F1 with the fine-tuned
    tagger in a sixth of the time (BENCHMARKS.md, "Features for the SLM's head", "A linear tagger").
    """

    model_config = ConfigDict(extra="forbid")

    initial_demos: Literal["auto", "generated", "none"] = "auto"
    demos_per_label: int = Field(default=16, ge=1)
    demos_per_call: int = Field(default=4, ge=1, le=20)
    max_calls_per_label: int | None = Field(default=None, ge=1)
    style_examples: int = Field(default=3, ge=1)
    generation_temperature: float = Field(default=0.8, ge=0)
    verify_demos: bool = True
    k: int = Field(default=10, ge=0)
    balanced: bool = True
    group_size: int | None = Field(default=32, ge=1)
    refinery_rounds: int = Field(default=2, ge=0)
    refined_label: Literal["combined", "new"] = "combined"
    min_change: float = Field(default=0.025, ge=0, le=1)
    clean_fraction: float = Field(default=0.2, gt=0, le=1)
    pool_size: int = Field(default=100, ge=1)
    zero_shot_baseline: bool = False
    refine: Literal["noisy", "disagree"] = "noisy"
    final_label: Literal["combined", "llm"] = "combined"
    slm_weight: float | None = Field(default=None, ge=0)
    deployed_slm: Literal["final_labels", "last_round"] = "final_labels"
    deployed_mode: Literal["head", "linear", "finetune"] | None = None
    min_kappa: float | None = Field(default=None, ge=-1, le=1)
    weak_labels: Literal["structure", "llm"] = "structure"
    seed: int = 0


class DataConfig(BaseModel):
    """Where texts come from. ``label_col`` names gold labels, read only to evaluate (absent is fine).

    For an NER task the file holds ``tokens`` (or ``text``) per sentence, or is a CoNLL column file;
    ``label_col`` then names the IOB2 tags field (``label``, the default, means ``tags``)."""

    model_config = ConfigDict(extra="forbid")

    path: Path
    text_col: str = "text"
    id_col: str | None = None
    label_col: str | None = "label"
    limit: int | None = Field(default=None, ge=1)
    seed: int = 0


class RunConfig(BaseModel):
    """A whole ``freeal run``: the task, the texts, where to write, and the three stages' settings."""

    model_config = ConfigDict(extra="forbid")

    task: Path | dict
    data: DataConfig
    test: DataConfig | None = None
    out: Path
    llm: LLMConfig = Field(default_factory=LLMConfig)
    slm: SLMConfig = Field(default_factory=SLMConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)


def run_key(spec: dict) -> str:
    """The 16-hex key of a run's fingerprint (settings, texts, models): it names a default run folder
    and the model version of exported predictions, so two different runs never share either."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

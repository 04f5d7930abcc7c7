"""Demonstrations: written by the LLM for the initial round, and who sees which.

Initial round: the LLM writes demonstrations for each label itself (:func:`generate_demonstrations`)
and checks them as it goes (:func:`zero_shot_check`). Refinery rounds show the feedback step's pool
(:mod:`freeal.feedback`). Either way each item to label gets its nearest demonstrations by cosine
similarity, balanced across classes so the LLM sees every label in context, and items are grouped
so that a group shares its demonstrations (:func:`demonstration_groups`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

from freeal.config import Calibration
from freeal.errors import FreeALError
from freeal.llm.cache import CachedAnnotator
from freeal.llm.prompts import generation_prompt
from freeal.tasks import Task

_NUMBERED = re.compile(r"^\s*(?:\d+[.):]|[-*•])\s*(.+?)\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

#: a style example is cut to its first sentence or two within this many words: it shows the
#: register, and a whole abstract would make the LLM write (and pay for) texts as long (issue 13)
STYLE_WORDS = 40


def nearest_demonstrations(
    query: np.ndarray,
    pool_embeddings: np.ndarray,
    pool_labels: Sequence[str],
    k: int = 10,
    balanced: bool = True,
) -> list[list[int]]:
    """For each query vector, positions in the pool of its ``k`` nearest members by cosine.

    ``balanced`` takes ``k // n_classes`` per class, at least one (the remainder going to the most
    similar of the rest), so every label appears. Each list is ordered least similar first, most
    similar last: the nearest demonstration then sits right before the item in the prompt.
    """
    if len(pool_labels) == 0:
        return [[] for _ in range(len(query))]
    sims = query @ pool_embeddings.T
    labels = np.asarray(pool_labels, dtype=object)
    out: list[list[int]] = []
    for row in sims:
        ranked = np.argsort(-row, kind="stable")
        if balanced:
            classes = sorted(set(pool_labels))
            share = max(1, k // len(classes))
            picked = [i for c in classes for i in ranked[labels[ranked] == c][:share]]
            taken = set(picked)
            picked += [i for i in ranked if i not in taken][: max(0, k - len(picked))]
        else:
            picked = list(ranked[:k])
        out.append(sorted(picked, key=lambda i: row[i]))
    return out


# -- the initial round: demonstrations written by the LLM ------------------------------------------


def normal_form(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how written texts are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def is_copy(norm: str, shown: Sequence[str]) -> bool:
    """Empty, or (nearly) one of the shown style examples: contained in it, containing it, or
    a character-level similarity of 0.8 or more (a copy with a word changed)."""
    return not norm or any(
        s and (norm in s or s in norm or SequenceMatcher(None, norm, s).ratio() >= 0.8) for s in shown
    )


def _per_label(demos: Sequence[tuple[str, str]], task: Task) -> dict[str, int]:
    return {label: sum(1 for _, lab in demos if lab == label) for label in task.label_names}


def excerpt(text: str, words: int = STYLE_WORDS) -> str:
    """The first sentence or two of ``text``, at most ``words`` words (cut, with "…", if the first
    sentence alone is longer)."""
    kept: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip())[:2]:
        if kept and len(" ".join([*kept, sentence]).split()) > words:
            break
        kept.append(sentence)
    tokens = " ".join(kept).split()
    return " ".join(tokens[:words]) + (" …" if len(tokens) > words else "")


def _unquoted(text: str) -> str:
    return text.strip().strip('"').strip("“”").strip()


def parse_generated(answer: str) -> list[str]:
    """The texts of a numbered (or bulleted) list, unquoted; lines that are not list entries dropped.

    An answer without any list entry that is a single line is read as one text: a small model often
    writes one text and no number (SmolLM2-135M, asked for TREC questions, answered "What can you
    get for your 13th dollar?"). Prose over several lines is a preamble or a story, and is dropped.
    """
    lines = [line for line in answer.splitlines() if line.strip()]
    texts = [_unquoted(m.group(1)) for m in map(_NUMBERED.match, lines) if m]
    if not texts and len(lines) == 1:
        texts = [_unquoted(lines[0])]
    return [t for t in texts if t]


def style_draws(
    names: Sequence[str], n_texts: int, shown: int, calls: int, seed: int
) -> dict[str, list[np.ndarray]]:
    """For each label (or entity type), the style texts each of its ``calls`` calls shows: ``shown``
    distinct indices below ``n_texts`` per call, from a random stream of the label's own (its place
    in ``names`` and ``seed``), so a call's texts are the same whichever calls go out before it."""
    size = min(shown, n_texts)
    draws = {}
    for place, name in enumerate(names):
        rng = np.random.default_rng([seed, place])
        draws[name] = [rng.choice(n_texts, size=size, replace=False) for _ in range(calls)]
    return draws


#: a check of written demonstrations: for each ``(text, label written for)``, whether the LLM, asked
#: zero-shot, gives that label, and its probability of it (:func:`zero_shot_check`)
Check = Callable[[Sequence[tuple[str, str]]], list[tuple[bool, float]]]


@dataclass
class GenerationReport:
    """What demonstration writing cost and how much of it was kept.

    ``written``: texts read from the answers; ``candidates``: those left after dropping copies and
    duplicates; ``kept``: the demonstrations handed on. With a check, ``verified`` of the kept are
    texts the LLM labels as intended and ``rejected`` candidates it labels otherwise.
    """

    calls: int
    written: int
    candidates: int
    kept: int
    dropped_copies: int
    dropped_duplicates: int
    per_label: dict[str, int]
    verified: int | None = None
    rejected: int | None = None


def zero_shot_check(task: Task, annotator: CachedAnnotator, calibrate: Calibration = "auto") -> Check:
    """A :data:`Check` by label scoring, zero-shot (one cheap call per text).

    A small model often writes a text that fits another label (on TREC, "How many miles is it from
    New York to Los Angeles?" written as a *description* question); shown as a demonstration, it
    teaches the wrong label. ``auto`` calibration is decided over all the texts checked together,
    so the writer checks every candidate so far each round (answers already given come from the
    cache): a round's few texts, perhaps of one label, would tilt the rule.
    """
    from freeal.annotate import label_groups

    def check(demos: Sequence[tuple[str, str]]) -> list[tuple[bool, float]]:
        texts = [t for t, _ in demos]
        frame = label_groups(
            task, texts, annotator, [(range(len(texts)), ())], calibrate=calibrate, progress=False
        )
        return [
            (frame["label"][i] == label, float((frame["probs"][i] or {}).get(label, 0.0)))
            for i, (_, label) in enumerate(demos)
        ]

    return check


def generate_demonstrations(
    task: Task,
    annotator: CachedAnnotator,
    style_texts: Sequence[str],
    *,
    per_label: int = 16,
    per_call: int = 4,
    style_examples: int = 3,
    temperature: float = 0.8,
    max_calls_per_label: int | None = None,
    seed: int = 0,
    check: Check | None = None,
    min_per_label: int = 3,
) -> tuple[list[tuple[str, str]], GenerationReport]:
    """``(text, label)`` demonstrations written by the LLM, ``per_label`` for each label if it can.

    Each call shows ``style_examples`` unlabeled texts (drawn from ``style_texts`` under ``seed``,
    each cut to its first sentence or two, :func:`excerpt`) and asks for new texts of one label, each
    no longer than the longest excerpt (so long texts cost a bounded number of tokens): ``per_call``,
    or fewer when the label needs fewer. Texts are candidates when non-empty, not a (near) copy of a
    style example (:func:`is_copy`), and not a duplicate of an earlier candidate (compared
    lower-cased without punctuation, across labels too: a text written for two labels is ambiguous
    and kept only for the first). Calls go out in rounds, one call for each label still short of its
    quota, all in one request, so a served model answers them concurrently; rounds continue until
    every quota is met or ``max_calls_per_label`` (default: twice the calls needed) is spent.

    With a ``check`` (:func:`zero_shot_check`) the quota counts the candidates the LLM labels as
    intended, checked after every round, so writing stops as soon as those suffice and a label whose
    texts the LLM rejects is asked again; the demonstrations are those texts, and a label left with
    fewer than ``min_per_label`` (or ``per_label``, if fewer) takes its other candidates the LLM
    scores highest for it, so every label still appears. A label that ends without any candidate is
    an error, since the prompts would never show it.

    What a call asks does not depend on the order calls go out in, nor on the other labels: each
    label draws its style texts from a random stream of its own, and a round's token budget follows
    the longest excerpt drawn for that round by every label, asked or not.
    """
    if not style_texts:
        raise FreeALError("demonstration writing needs at least one unlabeled text to show as style")
    budget = max_calls_per_label or 2 * math.ceil(per_label / per_call)
    draws = style_draws(task.label_names, len(style_texts), style_examples, budget, seed)
    candidates: list[tuple[str, str]] = []
    verdicts: list[tuple[bool, float]] = []
    seen: set[str] = set()
    written = copies = duplicates = calls = 0
    for attempt in range(budget):
        counted = _per_label([d for d, (ok, _) in zip(candidates, verdicts, strict=True) if ok], task)
        need = {label: per_label - counted[label] for label in task.label_names if counted[label] < per_label}
        if not need:
            break
        shown = {
            label: [excerpt(style_texts[int(i)]) for i in draws[label][attempt]] for label in task.label_names
        }
        # written texts as long as the longest excerpt: about 2 tokens a word, plus the numbering
        words = {label: max(len(t.split()) for t in examples) for label, examples in shown.items()}
        prompts = [
            generation_prompt(task, label, shown[label], min(per_call, n), max_words=words[label])
            for label, n in need.items()
        ]
        answers = dict(
            annotator.generate_many(
                prompts,
                max_tokens=per_call * min(80, 2 * max(words.values()) + 16),
                temperature=temperature,
                seed=seed + attempt,
            )
        )
        calls += len(prompts)
        for k, label in enumerate(need):  # in label order, whatever order the answers came in
            shown_norm = [normal_form(t) for t in shown[label]]
            for text in parse_generated(answers[k].text):
                written += 1
                norm = normal_form(text)
                if is_copy(norm, shown_norm):
                    copies += 1
                elif norm in seen:
                    duplicates += 1
                else:
                    seen.add(norm)
                    candidates.append((text, label))
        verdicts = check(candidates) if check and candidates else [(True, 1.0)] * len(candidates)
    kept: list[tuple[str, str]] = []
    verified = 0
    for label in task.label_names:
        mine = [i for i, (_, lab) in enumerate(candidates) if lab == label]
        if not mine:
            raise FreeALError(
                f"the LLM wrote no usable demonstration for label {label!r} in {budget} calls; "
                "describe the label more concretely in the task, or use a stronger model"
            )
        chosen = [i for i in mine if verdicts[i][0]][:per_label]
        verified += len(chosen)
        others = sorted((i for i in mine if not verdicts[i][0]), key=lambda i: -verdicts[i][1])
        floor = min(min_per_label, per_label)
        kept += [candidates[i] for i in chosen + others[: max(0, floor - len(chosen))]]
    report = GenerationReport(
        calls, written, len(candidates), len(kept), copies, duplicates, _per_label(kept, task)
    )
    if check:
        report.verified = verified
        report.rejected = sum(not ok for ok, _ in verdicts)
    return kept, report


# -- who sees which demonstrations ----------------------------------------------------------------


# Up to this many items to group, exact k-means on all of them, as freeal has always done: the
# groups, and so the prompts, cache hits and benchmark numbers, are identical to earlier runs up to
# this size. Exact k-means with n / group_size clusters costs n² / group_size distances per
# iteration (214 s at 50,000 texts), so larger sets are split first (:func:`_split_and_group`).
EXACT_GROUPING_MAX = 20_000
# Above EXACT_GROUPING_MAX, mini-batch k-means splits the items into parts of about LEAF_GROUPS
# groups' worth of items (at most SPLIT_FANOUT parts at a time, recursively); a part of up to twice
# that is grouped by exact k-means. A level costs n × SPLIT_FANOUT distances and the parts together
# n × 2 LEAF_GROUPS, so the whole is O(n log n) instead of O(n²). A flat MiniBatchKMeans with
# n / group_size clusters would not do: each of its assignment passes still costs n × n / group_size
# distances, and its k-means++ start over 31,250 centres (a million texts) alone would take days on
# a few cores.
SPLIT_FANOUT = 64
LEAF_GROUPS = 32
SPLIT_BATCH = 4096


def _positions_by_id(ids: np.ndarray) -> list[np.ndarray]:
    """The positions of each distinct id, ids ascending, positions ascending within each.

    The same arrays as ``[np.flatnonzero(ids == c) for c in np.unique(ids)]``, from one stable
    sort instead of a pass over every item per id (n² / group_size comparisons for clusters).
    """
    order = np.argsort(ids, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(ids[order])) + 1)


def _exact_groups(vectors: np.ndarray, group_size: int, seed: int) -> np.ndarray:
    """Cluster ids from k-means on all ``vectors``, about ``group_size`` items per cluster."""
    n_clusters = math.ceil(len(vectors) / group_size)
    return KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(vectors)


def _split_and_group(vectors: np.ndarray, group_size: int, seed: int) -> np.ndarray:
    """Cluster ids of about ``group_size`` items each, in O(n log n) for any number of items.

    Mini-batch k-means (seeded, mini-batches of SPLIT_BATCH) splits the items into coarse parts,
    recursively, until a part is small enough for exact k-means (2 LEAF_GROUPS clusters at most):
    a group's members are near each other whichever part they fell in, which is all a shared set of
    demonstrations needs. Ids are unique across parts, not consecutive.
    """
    n = len(vectors)
    if n <= group_size:
        return np.zeros(n, dtype=np.int64)
    by_position = np.arange(n, dtype=np.int64) // group_size
    if not np.ptp(vectors, axis=0).any():
        # identical vectors (a whole set, or a part of one: many copies of a text): any grouping is
        # as good. Checked at every depth, not left to k-means: scikit-learn 1.9's mini-batch k-means
        # splits them into parts of arbitrary size, and exact k-means leaves such a part one group
        return by_position
    if n <= 2 * LEAF_GROUPS * group_size:
        return _exact_groups(vectors, group_size, seed).astype(np.int64)
    n_parts = min(SPLIT_FANOUT, math.ceil(n / (LEAF_GROUPS * group_size)))
    splitter = MiniBatchKMeans(n_clusters=n_parts, batch_size=SPLIT_BATCH, n_init=3, random_state=seed)
    parts = _positions_by_id(splitter.fit_predict(vectors))
    if len(parts) == 1:  # near-identical vectors that k-means cannot tell apart
        return by_position
    ids = np.empty(n, dtype=np.int64)
    offset = 0
    for members in parts:
        sub = _split_and_group(vectors[members], group_size, seed)
        ids[members] = sub + offset
        offset += int(sub.max()) + 1
    return ids


def demonstration_groups(
    item_vectors: np.ndarray,
    demo_vectors: np.ndarray,
    demo_labels: Sequence[str],
    *,
    k: int = 10,
    balanced: bool = True,
    group_size: int | None = 32,
    seed: int = 0,
) -> list[tuple[np.ndarray, list[int]]]:
    """``(item positions, demonstration positions)`` groups: every item with its nearest demonstrations.

    ``group_size=None`` gives FreeAL's literal setting, each item its own ``k`` nearest (one group
    per item). Otherwise items are clustered (k-means on their unit embeddings, about
    ``group_size`` items per cluster) and a cluster shares the ``k`` demonstrations nearest to its
    centroid: neighbours of similar texts are mostly the same, and a shared set is a shared prompt
    prefix, so an embedded model evaluates the demonstrations once per group instead of once per
    item (BENCHMARKS.md measures both). Demonstrations are ordered most similar last. Up to
    EXACT_GROUPING_MAX items the clusters come from one k-means over all items, as they always
    have; above it from a hierarchical split whose cost grows as n log n (:func:`_split_and_group`).
    Groups come in ascending cluster id, a group's items in ascending position.
    """
    n = len(item_vectors)
    if n == 0:
        return []
    if k == 0 or len(demo_labels) == 0:
        return [(np.arange(n), [])]
    if group_size is None or n <= group_size:
        clusters = np.arange(n) if group_size is None else np.zeros(n, dtype=np.int64)
    elif n <= EXACT_GROUPING_MAX:
        clusters = _exact_groups(item_vectors, group_size, seed)
    else:
        clusters = _split_and_group(item_vectors, group_size, seed)
    groups = []
    for members in _positions_by_id(clusters):
        centre = item_vectors[members].mean(axis=0, keepdims=True)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        nearest = nearest_demonstrations(centre, demo_vectors, demo_labels, k=k, balanced=balanced)[0]
        groups.append((members, [int(j) for j in nearest]))
    return groups

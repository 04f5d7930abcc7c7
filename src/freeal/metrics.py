"""How right labels are, against gold labels kept apart for evaluation only."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

ABSTAIN = "<abstain>"


def classification_report(
    gold: Sequence[str | None], predicted: Sequence[str | None], labels: Sequence[str]
) -> dict:
    """Accuracy, macro-F1 and the confusion matrix over the rows that have a gold label.

    An abstention counts as a wrong answer (it is a row the user gets no label for), and appears as
    its own column of the confusion matrix when there is any.
    """
    pairs = [
        (g, p if p is not None else ABSTAIN) for g, p in zip(gold, predicted, strict=True) if g is not None
    ]
    if not pairs:
        return {"n": 0}
    g, p = zip(*pairs, strict=True)
    columns = [*labels, ABSTAIN] if ABSTAIN in p else list(labels)
    return {
        "n": len(pairs),
        "accuracy": float(accuracy_score(g, p)),
        "macro_f1": float(f1_score(g, p, labels=list(labels), average="macro", zero_division=0)),
        "abstained": sum(x == ABSTAIN for x in p),
        "labels": columns,
        "confusion": confusion_matrix(g, p, labels=columns).tolist(),
    }


def ner_report(gold: Sequence[Sequence[str] | None], predicted: Sequence[Sequence[str] | None]) -> dict:
    """Entity-level precision, recall and F1 (seqeval, strict IOB2 matching), overall and per type,
    over the sentences that have gold tags. A sentence with no prediction counts as predicting no
    entity (its gold entities are missed)."""
    from seqeval.metrics import classification_report as seqeval_report
    from seqeval.scheme import IOB2

    pairs = [
        (list(g), list(p) if p is not None else ["O"] * len(g))
        for g, p in zip(gold, predicted, strict=True)
        if g is not None
    ]
    if not pairs:
        return {"n": 0}
    g, p = zip(*pairs, strict=True)
    raw = seqeval_report(list(g), list(p), mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    per_type = {
        k: {m: float(v[m]) for m in ("precision", "recall", "f1-score", "support")}
        for k, v in raw.items()
        if not k.endswith(" avg")
    }
    micro = raw["micro avg"]
    return {
        "n": len(pairs),
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "entities": int(micro["support"]),
        "per_type": per_type,
    }

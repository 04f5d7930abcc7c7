"""Prompts for classification.

Order matters for speed as much as for accuracy: instructions and the label list come first and are
identical for every item, the item comes last, so a backend that reuses its KV cache for a shared
prefix (llama.cpp) evaluates only the item's own tokens. Demonstrations, when given, sit between the
two and are ordered by the caller (most similar last, nearest to the item).
"""

from __future__ import annotations

from collections.abc import Sequence

from freeal.llm.base import Message
from freeal.tasks import Task

#: Inputs without content, for contextual calibration (Zhao et al., 2021).
CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")


def system_prompt(task: Task) -> str:
    label_lines = "\n".join(f"- {name}: {desc}" for name, desc in task.labels.items())
    return (
        f"You are an expert annotator. Task: {task.description}\n"
        f"Possible labels:\n{label_lines}\n"
        "Answer with exactly one label name from the list and nothing else."
    )


def classification_prompt(
    task: Task, text: str, demonstrations: Sequence[tuple[str, str]] = ()
) -> list[Message]:
    """Chat messages asking for the label of ``text``; ``demonstrations`` are ``(text, label)`` pairs."""
    demo_block = "".join(f"Text: {d_text}\nLabel: {d_label}\n\n" for d_text, d_label in demonstrations)
    return [
        {"role": "system", "content": system_prompt(task)},
        {"role": "user", "content": f"{demo_block}Text: {text}\nLabel:"},
    ]


def generation_prompt(task: Task, label: str, style_texts: Sequence[str], n: int) -> list[Message]:
    """Ask for ``n`` new texts of class ``label``, in the style of a few unlabeled ``style_texts``.

    FreeAL's initial round: the LLM writes its own demonstrations from the task and label
    descriptions (label-conditioned generation). Unlabeled texts are shown only for their style and
    length; they carry no label, so no human annotation enters the prompt.
    """
    examples = "\n".join(f"- {t}" for t in style_texts)
    return [
        {"role": "system", "content": "You write realistic example data for a text labeling task."},
        {
            "role": "user",
            "content": (
                f"Task: {task.description}\n"
                f'Label "{label}": {task.labels[label]}\n\n'
                f"Unlabeled texts from the data set, to show the style and length:\n{examples}\n\n"
                f"Write {n} new, different texts in the same style that clearly belong to the label "
                f'"{label}". '
                f"Write one text per line, numbered 1. to {n}, and nothing else."
            ),
        },
    ]

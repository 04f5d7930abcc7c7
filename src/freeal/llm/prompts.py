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

"""Prompts for classification.

Order matters for speed as much as for accuracy: instructions and the label list come first and are
identical for every item, the item comes last, so a backend that reuses its KV cache for a shared
prefix (llama.cpp) evaluates only the item's own tokens. Demonstrations, when given, sit between the
two and are ordered by the caller (most similar last, nearest to the item).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def generation_prompt(
    task: Task, label: str, style_texts: Sequence[str], n: int, max_words: int | None = None
) -> list[Message]:
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
                + (f"Each text at most {max_words} words. " if max_words else "")
                + f"Write one text per line, numbered 1. to {n}, and nothing else."
            ),
        },
    ]


# -- named-entity recognition ----------------------------------------------------------------------


def ner_system_prompt(task: Task, json_output: bool = False) -> str:
    type_lines = "\n".join(f"- {name}: {desc}" for name, desc in task.labels.items())
    answer = (
        'Answer with a JSON list of objects {"type": ..., "text": ...}, one per mention, '
        "the text copied exactly from the sentence; [] when there is none. Nothing else."
        if json_output
        else "Answer with one mention per line as 'Type: mention', copying the mention exactly from "
        "the sentence, then a line 'END'. Write only 'END' when there is none."
    )
    return (
        f"You are an expert annotator. Task: {task.description}\n"
        f"Entity types:\n{type_lines}\n"
        f"List every entity mention of these types in the sentence. {answer}"
    )


def ner_prompt(
    task: Task, sentence: str, demonstrations: Sequence[tuple[str, str]] = (), json_output: bool = False
) -> list[Message]:
    """Chat messages asking for the entities of ``sentence``; ``demonstrations`` are
    ``(sentence, answer)`` pairs with the answer written in the requested format, given as earlier
    turns of the chat (small chat models follow answered turns better than examples inlined in one
    message: with inlined examples the 1.5B model answered ``END`` for most sentences)."""
    return [
        {"role": "system", "content": ner_system_prompt(task, json_output)},
        *answered_turns(demonstrations, lambda s: f"Sentence: {s}"),
        {"role": "user", "content": f"Sentence: {sentence}"},
    ]


def answered_turns(pairs: Sequence[tuple[str, str]], ask: Callable[[str], str]) -> list[Message]:
    """Each ``(input, answer)`` pair as a user turn (``ask(input)``) answered by an assistant turn:
    demonstrations as earlier turns of the chat rather than inlined in one message."""
    turns: list[Message] = []
    for given, answer in pairs:
        turns += [{"role": "user", "content": ask(given)}, {"role": "assistant", "content": answer}]
    return turns


def ner_generation_prompt(task: Task, focus: str, style_texts: Sequence[str], n: int) -> list[Message]:
    """Ask for ``n`` new sentences mentioning entities of type ``focus`` (others allowed), each with
    its entity list, in the style of a few unlabeled sentences of the data set."""
    type_lines = "\n".join(f"- {name}: {desc}" for name, desc in task.labels.items())
    examples = "\n".join(f"- {t}" for t in style_texts)
    return [
        {"role": "system", "content": "You write realistic example data for an entity annotation task."},
        {
            "role": "user",
            "content": (
                f"Task: {task.description}\nEntity types:\n{type_lines}\n\n"
                f"Unlabeled sentences from the data set, to show the style:\n{examples}\n\n"
                f"Write {n} new, different sentences in the same style, each mentioning at least one "
                f"{focus} entity. After each sentence list all its entity mentions, one per line as "
                "'<entity type>: <mention copied exactly from the sentence>', then a line 'END'. "
                f"Layout:\nSentence: <sentence>\n{focus}: <mention>\nEND"
            ),
        },
    ]

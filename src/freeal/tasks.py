"""Task specifications: what is being labeled and with which labels.

A task is plain data (name, kind, description, labels with one-line descriptions). The descriptions
go into prompts, so they are part of the task rather than of the code. Tasks load from YAML or JSON,
including the ``task.json`` files of ``../shared/data/*/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from freeal.config import validate
from freeal.errors import FreeALError


class Task(BaseModel):
    """A labeling task.

    ``labels`` maps each label name to a short description; its order is the label order used
    everywhere (prompt listing, confusion matrices, probability columns).
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(min_length=1)
    kind: Literal["classification", "ner"] = "classification"
    description: str = Field(min_length=1)
    labels: dict[str, str]
    scheme: str | None = None

    @field_validator("labels")
    @classmethod
    def _labels_nonempty(cls, labels: dict[str, str]) -> dict[str, str]:
        if not labels:
            raise ValueError("the label set is empty")
        for name in labels:
            if not name.strip():
                raise ValueError("a label name is empty")
        if len({n.strip().lower() for n in labels}) != len(labels):
            raise ValueError("two label names differ only in case or surrounding spaces")
        return labels

    @property
    def label_names(self) -> list[str]:
        return list(self.labels)

    def require_classification(self, what: str) -> None:
        """Refuse an NER task where whole texts get one label each (its types are no label set)."""
        if self.kind != "classification":
            raise FreeALError(
                f"task {self.name!r} is kind: {self.kind}, and {what} labels whole texts with one label "
                "each; run the FreeAL loop on it instead (`freeal run`, or FreeAL(task).fit in Python)"
            )


def load_task(path: str | Path) -> Task:
    """Read a task from a ``.json``, ``.yaml`` or ``.yml`` file (or a data folder holding ``task.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FreeALError(f"{path}: cannot read the task file ({exc})") from exc
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise FreeALError(
            f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'} ({exc})"
        ) from exc
    if not isinstance(raw, dict):
        raise FreeALError(f"{path}: a task file must hold a mapping with name, description and labels")
    return task_from_dict(raw, source=str(path))


def task_from_dict(raw: dict, source: str = "task") -> Task:
    """Validate a task given as a mapping; errors name ``source`` and the offending field."""
    return validate(Task, raw, source)

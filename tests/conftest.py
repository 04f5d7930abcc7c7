"""Shared fixtures: the real data in ../shared/data and the small real models."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA}")
    return DATA


@pytest.fixture(scope="session")
def smollm2():
    """The 135M SmolLM2 annotator: near chance, for plumbing."""
    from freeal.llm.llamacpp import LlamaCppAnnotator
    from freeal.llm.models import resolve_model

    path, name = resolve_model("smollm2-135m")
    return LlamaCppAnnotator(path, name=name, n_ctx=1024)

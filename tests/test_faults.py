"""Random SIGKILLs of a real loop run (bench/faults.py, fewer kills than the benchmark's 20)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_random_kills_repeat_no_committed_call_and_change_no_label(data_dir):
    path = Path(__file__).resolve().parents[1] / "bench" / "faults.py"
    spec = importlib.util.spec_from_file_location("faults", path)
    assert spec is not None and spec.loader is not None
    faults = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(faults)
    found = faults.kills(n_kills=3, limit=24, seed=1, quick=True, max_delay=9.0)
    assert found["kills"] >= 3 and found["labels_identical"]
    # a kill can land between an answer and its commit: at most the call in flight is paid again
    assert found["calls_repeated"] <= found["kills"]
    assert all(t["calls"] == found["reference_calls"] + t["calls_repeated"] for t in found["trials"])

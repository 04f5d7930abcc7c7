"""The classifier SLM's folds trained in worker processes: the same answers as one process gives."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from freeal.config import SLMConfig
from freeal.data import read_items
from freeal.errors import FreeALError
from freeal.kinds import kind_of
from freeal.slm import classifier, folds
from freeal.tasks import load_task

CFG = SLMConfig(
    mode="head", backbone="all-minilm-l6-v2", epochs=4, warmup_epochs=1, cross_fit=3, device="cpu"
)
ROUNDING = 1e-6  # float32 probabilities near 0.5 are spaced 6e-8 apart: a few steps of rounding


@pytest.fixture(autouse=True)
def no_kept_workers():
    """Each test starts and ends without worker processes kept from another."""
    folds.stop_workers()
    yield
    folds.stop_workers()


@pytest.fixture
def sst2(data_dir):
    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "train.jsonl", task=task, limit=240, seed=5)
    # some labels flipped and some abstentions, so the folds disagree with the labels somewhere
    given: list[str | None] = list(items.gold)
    for i in range(0, len(given), 7):
        given[i] = "positive" if given[i] == "negative" else "negative"
    for i in range(3, len(given), 25):
        given[i] = None
    return task, items, given


def started(monkeypatch) -> list[list[str]]:
    """The commands of the worker processes started from now on."""
    commands: list[list[str]] = []
    popen = subprocess.Popen

    def spy(command, *args, **kwargs):
        commands.append(command)
        return popen(command, *args, **kwargs)

    monkeypatch.setattr(folds.subprocess, "Popen", spy)
    return commands


def openmp_threads() -> list[int]:
    """The thread count of each OpenMP runtime loaded in this process."""
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "openmp"]


def test_folds_in_workers_give_the_same_model_and_probabilities_as_one_process(sst2, monkeypatch):
    task, items, given = sst2
    kind = kind_of(task)
    monkeypatch.setattr(folds, "PARALLEL_MIN_ITEMS", 100)
    monkeypatch.setenv(folds.ENV_VAR, "1")
    alone = kind.train(items, given, CFG, lambda _: None)
    split_threads: list[int] = []
    split = classifier.split_clean

    def spy(*args, **kwargs):
        split_threads.extend(openmp_threads())
        return split(*args, **kwargs)

    monkeypatch.setattr(classifier, "split_clean", spy)
    commands = started(monkeypatch)
    assert commands == []
    monkeypatch.setenv(folds.ENV_VAR, "3")
    threads = openmp_threads()
    beside = kind.train(items, given, CFG, lambda _: None)
    assert len(commands) == 2  # 3 folds on 3 cores: the main model here, the folds in 2 workers
    # beside busy workers this process's clean split (scikit-learn's OpenMP) ran on one thread, and
    # the limit ends with the step
    assert split_threads and set(split_threads) == {1}
    assert openmp_threads() == threads
    assert alone.proba is not None and beside.proba is not None
    # one torch thread and two sum in another order on some CPUs (seen on a CI machine: 6e-8), so
    # the probabilities agree to float32 rounding and every decision made from them is the same
    np.testing.assert_allclose(beside.proba, alone.proba, rtol=0, atol=ROUNDING)
    np.testing.assert_allclose(beside.model.train_proba_, alone.model.train_proba_, rtol=0, atol=ROUNDING)
    np.testing.assert_array_equal(beside.clean, alone.clean)
    assert beside.predicted == alone.predicted
    again = kind.train(items, given, CFG, lambda _: None)  # the next round: the same workers
    assert len(commands) == 2
    np.testing.assert_array_equal(again.proba, beside.proba)


def test_small_sets_and_views_keep_the_folds_in_this_process(sst2, monkeypatch):
    task, items, given = sst2
    commands = started(monkeypatch)
    monkeypatch.setenv(folds.ENV_VAR, "2")
    kind_of(task).train(items, given, CFG, lambda _: None)  # 240 items, under PARALLEL_MIN_ITEMS
    monkeypatch.setattr(folds, "PARALLEL_MIN_ITEMS", 100)
    consistency = CFG.model_copy(update={"lambda_u": 1.0})  # views to embed: not in a worker
    kind_of(task).train(items, given, consistency, lambda _: None)
    assert commands == []


def test_a_failed_worker_is_one_clear_error(sst2, monkeypatch):
    task, items, given = sst2
    monkeypatch.setattr(folds, "PARALLEL_MIN_ITEMS", 100)
    monkeypatch.setenv(folds.ENV_VAR, "2")
    monkeypatch.setattr(folds.sys, "executable", "false")  # a worker that exits at once with 1
    with pytest.raises(FreeALError, match=r"an SLM fold worker failed \(exit 1\)"):
        kind_of(task).train(items, given, CFG, lambda _: None)


@pytest.mark.parametrize(
    ("n_folds", "n_lanes", "expected"),
    [(5, 1, [[0, 1, 2, 3, 4]]), (5, 2, [[2, 4], [0, 1, 3]]), (2, 8, [[], [0], [1]])],
)
def test_folds_go_to_the_least_loaded_lane(n_folds, n_lanes, expected):
    assert folds.plan_lanes(n_folds, n_lanes) == expected


def test_a_bad_process_count_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(folds.ENV_VAR, "two")
    with pytest.raises(FreeALError, match="FREEAL_SLM_PROCESSES='two'"):
        folds.cores()

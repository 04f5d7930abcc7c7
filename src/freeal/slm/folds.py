"""The classifier SLM of a round: the model on every item, and each item's held-out probabilities.

Cross-fitting (``cross_fit`` folds) trains one more model per fold, each on the other folds' items,
and asks it about the fold it did not see: a model's opinion of its own training labels is mostly
the labels, memorised. In ``head`` mode on a CPU these six small fits are most of freeal's own time
per round (72% of the 10k-text loop, BENCHMARKS.md), and each uses one core as fast as two (the
batches are small). So on a machine with several cores the folds are trained beside the main model,
in worker processes of one thread each, kept from round to round: on 2 cores the SLM step of the
10k loop took 39% less time, and 1.5x less at 1,000 texts once the worker had started.

The answers are those one process gives: every fit seeds its own generators when it starts, and a
fold's inputs are the rows the shared embedder would give it. Bit for bit on the two CPUs measured;
on another, one torch thread summed in another order than two (6e-8 apart), so what is promised,
and checked by a test, is the same probabilities to float32 rounding and the same decisions.

A worker is a fresh interpreter (``python -m freeal.slm.folds``), not a fork: forking a process
that holds llama.cpp or HTTP threads can deadlock, and multiprocessing's spawn would import the
user's own script again.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from freeal.config import SLMConfig
from freeal.errors import FreeALError
from freeal.slm.classifier import SLMClassifier

#: Fewer items than this train their folds in this process. A worker's start (a fresh interpreter
#: importing torch and scikit-learn: about 5 s of a core) is paid back from the second round on at
#: 1,000 texts, where the six fits take 4-5 s in one process (BENCHMARKS.md); below, it is not.
PARALLEL_MIN_ITEMS = 1000

#: processes the folds may use, this one included (1: all in this one); default: the cores
ENV_VAR = "FREEAL_SLM_PROCESSES"


def cores() -> int:
    """Processes the folds may use: ``$FREEAL_SLM_PROCESSES``, or the cores this process may run on."""
    given = os.environ.get(ENV_VAR)
    if given:
        if not given.isdigit() or int(given) < 1:
            raise FreeALError(f"{ENV_VAR}={given!r}: give a whole number of processes, 1 or more")
        return int(given)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_with_held_out(
    labels: Sequence[str],
    cfg: SLMConfig,
    texts: Sequence[str],
    given: Sequence[str | None],
    embedder: Any,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[SLMClassifier, np.ndarray | None]:
    """The SLM trained on every item, and (``cross_fit`` ≥ 2) every item's probabilities from the
    fold model that did not train on it (None without cross-fitting)."""
    from sklearn.model_selection import KFold

    folds = (
        list(KFold(min(cfg.cross_fit, len(texts)), shuffle=True, random_state=cfg.seed).split(texts))
        if cfg.cross_fit >= 2
        else []
    )
    lanes = plan_lanes(len(folds), cores() if _parallel(cfg, len(texts)) else 1)
    fits = _Fits(folds, labels, cfg, texts, given, embedder)
    held_out = np.zeros((len(texts), len(labels)))
    with _workers(lanes[1:], fits) as workers:
        model = SLMClassifier(labels, cfg, embedder=embedder).fit(texts, given, on_epoch=on_epoch)
        for f, proba in [*((f, fits.held_proba(f)) for f in lanes[0]), *workers()]:
            held_out[folds[f][1]] = proba
    return model, held_out if folds else None


def _parallel(cfg: SLMConfig, n: int) -> bool:
    """Whether folds may train in workers: a head on cached vectors, on a CPU, in one process, and no
    augmented views to embed (the consistency loss off), so a worker needs only the texts' vectors."""
    from freeal.embed import torch_device

    return (
        cfg.mode == "head"
        and torch_device(cfg.device) == "cpu"
        and not (cfg.robust and cfg.lambda_u > 0)
        and int(os.environ.get("WORLD_SIZE", "1")) <= 1
        and n >= PARALLEL_MIN_ITEMS
    )


def plan_lanes(n_folds: int, n_lanes: int) -> list[list[int]]:
    """Folds per lane (a process), lane 0 being this one, which first trains the main model on all
    items (``n_folds / (n_folds - 1)`` folds' worth of work): each fold goes to the lane with the
    least work so far."""
    n_lanes = max(1, min(n_lanes, n_folds + 1))
    work = [n_folds / (n_folds - 1) if n_folds > 1 else 1.0] + [0.0] * (n_lanes - 1)
    lanes: list[list[int]] = [[] for _ in range(n_lanes)]
    for f in range(n_folds):
        lane = int(np.argmin(work))
        lanes[lane].append(f)
        work[lane] += 1.0
    return lanes


@dataclass
class _Fits:
    """What the folds train from: each fold's (train, held) rows, the label set, the settings, the
    texts, their given labels, and the embedder that holds their vectors."""

    folds: list[tuple[np.ndarray, np.ndarray]]
    labels: Sequence[str]
    cfg: SLMConfig
    texts: Sequence[str]
    given: Sequence[str | None]
    embedder: Any

    def held_proba(self, f: int) -> np.ndarray:
        """Fold ``f``'s held items' probabilities from a model trained on its other items (uniform
        when those were all abstentions: nothing to learn, no opinion)."""
        train, held = self.folds[f]
        if all(self.given[i] is None for i in train):
            return np.full((len(held), len(self.labels)), 1 / len(self.labels))
        model = SLMClassifier(self.labels, self.cfg, embedder=self.embedder)
        model.fit([self.texts[i] for i in train], [self.given[i] for i in train])
        return model.predict_proba([self.texts[i] for i in held])


class _Worker:
    """A worker process, kept for later rounds: its start (a fresh interpreter importing torch and
    scikit-learn) takes about 5 s of a core, more than a round's folds at 1,000 texts. It reads one
    job a line on stdin and answers ``ok`` or ``error`` on stdout; its messages go to a log file."""

    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="freeal-folds-", suffix=".log", delete=False)  # noqa: SIM115
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "freeal.slm.folds", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            text=True,
        )
        self.used = time.monotonic()

    def fresh(self) -> bool:
        """Alive, and not about to leave on its own for having waited too long (``IDLE_EXIT``)."""
        return self.proc.poll() is None and time.monotonic() - self.used < IDLE_EXIT - 60

    def send(self, job: Path, folds: list[int]) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{job}\t{','.join(map(str, folds))}\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.failed()

    def wait(self) -> None:
        assert self.proc.stdout is not None
        answer = self.proc.stdout.readline().strip()
        self.used = time.monotonic()
        if answer != "ok":
            self.failed()

    def failed(self) -> None:
        try:  # its output closed: it is ending, or has ended
            code: int | None = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        self.log.flush()
        tail = Path(self.log.name).read_text(errors="replace")[-2000:]
        self.stop()
        state = "still running" if code is None else f"exit {code}"
        raise FreeALError(f"an SLM fold worker failed ({state}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


#: a worker waiting this long for a job leaves (the process that started it has long stopped
#: labeling); this process replaces it a minute before that
IDLE_EXIT = 600.0
_workers_kept: list[_Worker] = []


def stop_workers() -> None:
    """End the kept worker processes (they also end with this process, or when idle ``IDLE_EXIT``)."""
    while _workers_kept:
        _workers_kept.pop().stop()


atexit.register(stop_workers)


@contextmanager
def _workers(lanes: list[list[int]], fits: _Fits) -> Iterator[Callable[[], Iterator[tuple[int, np.ndarray]]]]:
    """Give each lane with folds to a worker; yield a function that waits for their results. This
    process trains with one thread meanwhile (two threads against busy workers run many times
    slower). Leaving the block early stops the workers (they may be busy with an abandoned job)."""
    lanes = [lane for lane in lanes if lane]
    if not lanes:
        yield lambda: iter(())
        return
    for worker in [w for w in _workers_kept if not w.fresh()]:
        _workers_kept.remove(worker)
        worker.stop()
    while len(_workers_kept) < len(lanes):
        _workers_kept.append(_Worker())
    workers = _workers_kept[: len(lanes)]
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="freeal-folds-") as tmp:
        job = Path(tmp)
        done = False
        try:
            _write_job(job, fits)
            for worker, lane in zip(workers, lanes, strict=True):
                worker.send(job, lane)

            def results() -> Iterator[tuple[int, np.ndarray]]:
                for worker, lane in zip(workers, lanes, strict=True):
                    worker.wait()
                    for f in lane:
                        yield f, np.load(job / f"fold{f}.npy")

            # one thread here while they train, for scikit-learn's OpenMP too (the clean split's GMM
            # starts from k-means): at two threads against a busy worker its spin-waits took 5 of
            # the 10k loop's 21 s of SLM. The limit, left first, restores torch's count as it found it.
            with threadpool_limits(limits=1):
                torch.set_num_threads(1)
                yield results
            done = True
        finally:
            torch.set_num_threads(threads)
            if not done:
                stop_workers()


def _write_job(job: Path, fits: _Fits) -> None:
    """What a worker needs: the settings, the labels as codes, the folds, and the texts' vectors as
    the shared embedder would give them to a fold (a text's vector is that of its last occurrence,
    as the embedder remembers it), addressed by row."""
    labels, texts, given = fits.labels, fits.texts, fits.given
    vectors = fits.embedder.vectors_of(texts)
    path = getattr(vectors, "filename", None)
    if path is None:
        path = job / "vectors.npy"
        np.save(path, vectors)
    last = {t: i for i, t in enumerate(texts)}
    index = {name: i for i, name in enumerate(labels)}
    np.save(job / "rows.npy", np.asarray([last[t] for t in texts], dtype=np.int64))
    np.save(job / "given.npy", np.asarray([-1 if g is None else index[g] for g in given], dtype=np.int64))
    for f, (train, held) in enumerate(fits.folds):
        np.save(job / f"train{f}.npy", train)
        np.save(job / f"held{f}.npy", held)
    meta = {
        "labels": list(labels),
        "config": fits.cfg.model_dump(),
        "vectors": str(path),
        "folds": len(fits.folds),
    }
    (job / "job.json").write_text(json.dumps(meta))


class _Rows:
    """A worker's embedder: its "texts" are row numbers of the job's vectors."""

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = vectors

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.vectors[[int(t) for t in texts]])


def _work(job: Path, fold_numbers: list[int]) -> None:
    """Train the given folds of a job and write each one's held-out probabilities."""
    meta = json.loads((job / "job.json").read_text())
    labels = meta["labels"]
    fits = _Fits(
        folds=[(np.load(job / f"train{f}.npy"), np.load(job / f"held{f}.npy")) for f in range(meta["folds"])],
        labels=labels,
        cfg=SLMConfig(**meta["config"]),
        texts=[str(row) for row in np.load(job / "rows.npy")],
        given=[None if code < 0 else labels[code] for code in np.load(job / "given.npy")],
        embedder=_Rows(np.load(meta["vectors"], mmap_mode="r")),
    )
    for f in fold_numbers:
        tmp = job / f"fold{f}.tmp.npy"
        np.save(tmp, fits.held_proba(f))
        tmp.replace(job / f"fold{f}.npy")


def _serve(parent: int) -> None:
    """A worker's life: jobs from stdin until it closes, the parent is gone, or none came for
    ``IDLE_EXIT`` seconds. Anything the training prints goes to stderr (the log), not the answers."""
    import select
    import traceback

    torch.set_num_threads(1)
    answers, sys.stdout = sys.stdout, sys.stderr

    def orphaned() -> None:  # the parent was killed: stop, nobody will read the results
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    while select.select([sys.stdin], [], [], IDLE_EXIT)[0]:
        line = sys.stdin.readline()
        if not line:
            return
        job, numbers = line.rstrip("\n").split("\t")
        try:
            _work(Path(job), [int(f) for f in numbers.split(",")])
            answers.write("ok\n")
        except Exception:
            traceback.print_exc()
            sys.stderr.flush()
            answers.write("error\n")
        answers.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))

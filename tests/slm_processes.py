"""Trains one SLM in the process group ``torchrun`` (or ``accelerate launch``) started; run by
``test_slm.py``. Each process writes what it ended with, so the test can check that the processes
split the work and still hold one model."""

import hashlib
import json
import sys
from pathlib import Path

import torch

from freeal.config import SLMConfig
from freeal.data import read_items
from freeal.slm.classifier import SLMClassifier
from freeal.tasks import load_task


def main() -> None:
    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    task = load_task(data)
    items = read_items(data / "train.jsonl", task=task, limit=40, seed=1)
    cfg = SLMConfig(
        mode="finetune", epochs=2, warmup_epochs=1, rampup_epochs=1, lambda_u=1.0, device="cpu", max_length=16
    )
    slm = SLMClassifier(task.label_names, cfg).fit(items.texts, items.gold)
    digest = hashlib.sha256()
    for tensor in slm.net.state_dict().values():
        digest.update(tensor.detach().cpu().numpy().tobytes())
    result = {
        "rank": slm.rank,
        "world": slm.world,
        "main": slm.main_process,
        "weights": digest.hexdigest(),
        "train_proba": slm.train_proba_.round(5).tolist(),
        "clean": slm.clean_mask_.tolist(),
    }
    (out / f"rank{slm.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()

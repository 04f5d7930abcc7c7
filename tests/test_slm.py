"""The SLM on small real slices (all-MiniLM-L6-v2 shipped offline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from freeal.config import SLMConfig
from freeal.data import read_items
from freeal.errors import FreeALError
from freeal.feedback import select_clean
from freeal.slm.classifier import SLMClassifier
from freeal.tasks import load_task


@pytest.fixture(scope="module")
def sst2_slice(data_dir):
    task = load_task(data_dir / "sst2")
    items = read_items(data_dir / "sst2" / "train.jsonl", task=task, limit=800, seed=5)
    rng = np.random.default_rng(5)
    flip = rng.random(len(items)) < 0.3
    noisy = [
        ("positive" if g == "negative" else "negative") if f else g
        for f, g in zip(flip, items.gold, strict=True)
    ]
    return task, items, noisy


@pytest.fixture(scope="module")
def trained(sst2_slice):
    task, items, noisy = sst2_slice
    cfg = SLMConfig(mode="head", epochs=12, warmup_epochs=3, device="cpu")
    return SLMClassifier(task.label_names, cfg).fit(items.texts, noisy)


def test_gmm_split_separates_injected_noise(sst2_slice, trained):
    _, items, noisy = sst2_slice
    right = np.array([n == g for n, g in zip(noisy, items.gold, strict=True)])
    assert right.mean() == pytest.approx(0.7, abs=0.05)
    clean = trained.clean_mask_
    assert 0.3 < clean.mean() < 0.95
    assert right[clean].mean() > right.mean() + 0.1
    assert right[~clean].mean() < right.mean()
    predicted = [trained.labels[i] for i in trained.train_proba_.argmax(1)]
    agree = [n == p for n, p in zip(noisy, predicted, strict=True)]
    chosen = select_clean(noisy, agree, trained.mean_loss_, 0.2)
    assert right[chosen].mean() > 0.9


def test_predictions_are_distributions_and_survive_save_load(sst2_slice, trained, tmp_path):
    _, items, _ = sst2_slice
    texts = items.texts[:20]
    proba = trained.predict_proba(texts)
    assert proba.shape == (20, 2)
    assert np.allclose(proba.sum(1), 1)
    trained.save(tmp_path / "slm")
    loaded = SLMClassifier.load(tmp_path / "slm", device="cpu")
    assert np.allclose(loaded.predict_proba(texts), proba, atol=1e-5)
    assert loaded.predict(texts) == trained.predict(texts)


def test_a_head_on_layer_means_learns_from_its_own_cached_vectors(sst2_slice, tmp_path, monkeypatch):
    """``pooling: layers``: the head's inputs are every layer's token means, one unit vector per
    text whatever else is in its batch, cached apart from the sentence vectors of the same texts,
    and a saved model keeps the pooling it learned on."""
    from freeal.embed import Embedder

    task, items, _ = sst2_slice
    texts, gold = items.texts[:160], items.gold[:160]
    monkeypatch.setenv("FREEAL_CACHE_DIR", str(tmp_path))
    cfg = SLMConfig(mode="head", pooling="layers", epochs=3, warmup_epochs=1, device="cpu")
    model = SLMClassifier(task.label_names, cfg).fit(texts, gold)
    layers = Embedder(device="cpu", pooling="layers")
    with monkeypatch.context() as patch:
        patch.setattr(Embedder, "_model_encode", lambda self, t: pytest.fail("encoded again"))
        cached = layers.vectors_of(texts)  # the fit's own vectors, from the cache
    assert np.allclose(np.linalg.norm(cached, axis=1), 1, atol=1e-5)
    alone = Embedder(device="cpu", pooling="layers", cache=False).encode([texts[7], texts[3]])
    assert np.allclose(alone, cached[[7, 3]], atol=1e-4)  # batch and length order change nothing
    sentence = Embedder(device="cpu").vectors_of(texts)
    assert np.mean(np.sum(sentence * cached, axis=1)) < 0.95  # other vectors, another cache file
    assert layers.identity != Embedder(device="cpu").identity
    model.save(tmp_path / "slm")
    loaded = SLMClassifier.load(tmp_path / "slm", device="cpu")
    assert loaded.config.pooling == "layers"
    assert np.allclose(loaded.predict_proba(texts[:20]), model.predict_proba(texts[:20]), atol=1e-5)


def test_the_linear_slm_splits_injected_noise_from_held_out_losses(sst2_slice, tmp_path):
    """``mode: linear`` (the SLM the loop hands back): a logistic regression on layer means whose
    clean side is right more often than the labels, whose held-out opinions are not its memorised ones, and
    which comes back from disk predicting the same."""
    from freeal.kinds.classification import Classification
    from freeal.slm.linear import LinearSLM

    task, items, noisy = sst2_slice
    cfg = SLMConfig(mode="linear", device="cpu")
    assert cfg.pooling == "layers"
    model = LinearSLM(task.label_names, cfg).fit(items.texts, noisy)
    right = np.array([n == g for n, g in zip(noisy, items.gold, strict=True)])
    assert right[model.clean_mask_].mean() > right.mean() + 0.1
    assert right[~model.clean_mask_].mean() < right.mean()
    given = np.array([task.label_names.index(n) for n in noisy])
    own = (model.train_proba_.argmax(1) == given).mean()
    assert (model.held_out_proba_.argmax(1) == given).mean() < own  # a fold model never saw its item
    gold = np.array([task.label_names.index(g) for g in items.gold])
    assert (model.held_out_proba_.argmax(1) == gold).mean() > 0.6  # it learned the task, not noise
    model.save(tmp_path / "slm")
    loaded = Classification(task).load_model(tmp_path / "slm", device="cpu")
    assert isinstance(loaded, LinearSLM)
    assert np.allclose(loaded.predict_proba(items.texts[:20]), model.predict_proba(items.texts[:20]))
    assert len(model.epoch_log) == 1 and model.epoch_log[0]["held_out_loss"] > model.epoch_log[0]["loss"]


def test_a_head_saved_before_pooling_existed_loads_on_sentence_vectors():
    """A model saved before ``pooling`` was a setting learned on sentence vectors: its settings,
    read back without the key, must say so whatever the default for a new ``head`` or ``linear``."""
    saved = SLMConfig(mode="head").model_dump()
    del saved["pooling"]
    assert SLMConfig(**saved).pooling == "sentence"
    assert SLMConfig(mode="finetune").pooling is None  # a fine-tuned encoder pools as it learned
    with pytest.raises(FreeALError, match="LinearSLM"):
        SLMClassifier(["a", "b"], SLMConfig(mode="linear"))


@pytest.mark.parametrize("mode", ["head", "linear"])
def test_bad_labels_are_clear_errors(mode):
    from freeal.kinds.classification import slm_class

    make = slm_class(mode)
    slm = make(["a", "b"], SLMConfig(mode=mode, device="cpu"))
    with pytest.raises(FreeALError, match=r"item 1: label 'c' is not in the label set"):
        slm.fit(["x", "y"], ["a", "c"])
    with pytest.raises(FreeALError, match="all abstained"):
        slm.fit(["x", "y"], [None, None])
    with pytest.raises(FreeALError, match="same length"):
        slm.fit(["x", "y"], ["a"])
    with pytest.raises(FreeALError, match="not trained"):
        slm.predict(["x"])
    with pytest.raises(FreeALError, match="label set is empty"):
        make([])


def test_a_class_without_items_still_trains(sst2_slice, caplog):
    """Documented fallback: a label no item carries can only be learned through the consistency
    loss; the model still trains and predicts over the whole label set."""
    task, items, _ = sst2_slice
    labels = [*task.label_names, "neutral"]
    slm = SLMClassifier(labels, SLMConfig(mode="head", epochs=3, warmup_epochs=1, device="cpu"))
    slm.fit(items.texts[:200], items.gold[:200])
    assert "no labeled item for ['neutral']" in caplog.text
    assert slm.predict_proba(items.texts[:5]).shape == (5, 3)


def test_finetune_mode_trains_the_encoder(sst2_slice):
    task, items, _ = sst2_slice
    cfg = SLMConfig(mode="finetune", epochs=2, warmup_epochs=1, rampup_epochs=1, device="cpu", max_length=32)
    slm = SLMClassifier(task.label_names, cfg)
    slm.fit(items.texts[:96], items.gold[:96])
    assert slm.net.encoder is not None
    assert len(slm.epoch_log) == 2 and slm.epoch_log[1]["ramp"] == 1.0
    assert slm.predict_proba(items.texts[:4]).shape == (4, 2)


def test_robust_training_without_warm_up_splits_from_the_first_epoch(sst2_slice):
    task, items, noisy = sst2_slice
    cfg = SLMConfig(mode="head", epochs=2, warmup_epochs=0, lambda_u=1.0, device="cpu")
    slm = SLMClassifier(task.label_names, cfg).fit(items.texts[:100], noisy[:100])
    assert slm.epoch_log[0]["ramp"] > 0 and slm.epoch_log[0]["clean_fraction"] < 1.0
    assert slm.epoch_log[1]["consistency"] > 0  # the noisy items train through their views


def test_a_head_fit_repeats_itself_under_its_seed_and_not_under_another(sst2_slice):
    """A resumed run retrains the SLM: the same seed must give the same model (initial weights,
    order, dropout masks), another seed another one."""
    task, items, noisy = sst2_slice

    def fit(seed: int) -> np.ndarray:
        cfg = SLMConfig(mode="head", epochs=3, warmup_epochs=1, device="cpu", seed=seed)
        return SLMClassifier(task.label_names, cfg).fit(items.texts[:200], noisy[:200]).train_proba_

    first = fit(0)
    assert np.array_equal(first, fit(0))
    assert not np.allclose(first, fit(1))


def test_a_head_fit_on_cached_embeddings_imports_no_transformers(data_dir, tmp_path):
    """``head`` mode needs only the embeddings: with them cached, the SLM step must not pay for
    importing transformers (about a second, most of the step's start at 10,000 texts)."""
    code = (
        "import sys, json\n"
        "from freeal.config import SLMConfig\n"
        "from freeal.data import read_items\n"
        "from freeal.extras import require\n"
        "from freeal.slm.classifier import SLMClassifier\n"
        "from freeal.tasks import load_task\n"
        f"task = load_task({str(data_dir / 'sst2')!r})\n"
        f"items = read_items({str(data_dir / 'sst2' / 'train.jsonl')!r}, task=task, limit=60, seed=1)\n"
        "require('torch', 'transformers', what='the SLM (classifier)')\n"  # as the loop checks first
        "cfg = SLMConfig(mode='head', epochs=2, warmup_epochs=1, device='cpu')\n"
        "SLMClassifier(task.label_names, cfg).fit(items.texts, items.gold)\n"
        "print(json.dumps('transformers' in sys.modules))\n"
    )
    env = {**os.environ, "FREEAL_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True) for _ in "12"
    ]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    assert json.loads(runs[0].stdout) is True  # the first fit encoded the texts
    assert json.loads(runs[1].stdout) is False  # the second found them cached


def test_unknown_backbone_is_one_clear_error(tmp_path):
    from freeal.embed import encoder_path

    with pytest.raises(FreeALError, match=r"not a known encoder \(all-minilm-l6-v2, all-mpnet-base-v2\)"):
        encoder_path("roberta-base")
    assert encoder_path(str(tmp_path)) == str(tmp_path)  # a local folder is taken as is


def test_processes_started_by_torchrun_share_the_work_and_end_with_one_model(data_dir, tmp_path):
    """Two CPU processes (gloo), as ``accelerate launch`` starts one per GPU: each trains on half of
    every batch; without the averaged gradients their weights would differ."""
    script = Path(__file__).with_name("slm_processes.py")
    # --standalone: torchrun picks a free port, so two test runs on one machine never collide
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(script)]
    run = subprocess.run(
        [*command, str(data_dir / "sst2"), str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (first["world"], second["world"]) == (2, 2)
    assert (first["main"], second["main"]) == (True, False)
    assert first["weights"] == second["weights"]
    assert first["train_proba"] == second["train_proba"] and first["clean"] == second["clean"]

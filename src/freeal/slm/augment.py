"""Offline text augmentation for the consistency loss: a second view of a text with the same label.

FreeAL used back-translation, which needs a translation model; a user may pass such views as a column
(``views``). Without one, :func:`token_noise` makes an EDA-style view (random token deletion and
swaps), which needs no model, no network and no synonym list.
"""

from __future__ import annotations

import numpy as np


def token_noise(text: str, rng: np.random.Generator, p_delete: float = 0.1, n_swaps: int = 1) -> str:
    """Delete each token with probability ``p_delete`` (keeping at least one), then swap ``n_swaps`` pairs."""
    tokens = text.split()
    if len(tokens) < 2:
        return text
    kept = [t for t in tokens if rng.random() >= p_delete] or [tokens[int(rng.integers(len(tokens)))]]
    for _ in range(n_swaps if len(kept) > 1 else 0):
        i, j = rng.choice(len(kept), size=2, replace=False)
        kept[i], kept[j] = kept[j], kept[i]
    return " ".join(kept)


def make_views(texts: list[str], seed: int = 0) -> list[str]:
    """One :func:`token_noise` view per text, reproducible under ``seed``."""
    rng = np.random.default_rng(seed)
    return [token_noise(t, rng) for t in texts]

"""The clean/noisy split: a two-component Gaussian mixture on per-item losses (the functional core).

Networks fit clean labels before noisy ones, so early in training mislabeled items have larger
losses. A 2-component GMM on the min-max normalized losses gives each item the posterior of the
low-loss component: its probability of carrying a clean label (as in DivideMix and FreeAL).
"""

from __future__ import annotations

import numpy as np
from sklearn.mixture import GaussianMixture


def clean_probability(losses: np.ndarray, seed: int = 0) -> np.ndarray:
    """Posterior of the low-mean component for each loss; all ones when the losses do not vary."""
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size < 2 or np.ptp(losses) < 1e-12:
        return np.ones_like(losses)
    scaled = ((losses - losses.min()) / np.ptp(losses)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-2, reg_covar=5e-4, random_state=seed)
    gmm.fit(scaled)
    low = int(np.argmin(gmm.means_.ravel()))
    return gmm.predict_proba(scaled)[:, low]


def split_clean(
    losses: np.ndarray, threshold: float = 0.7, seed: int = 0, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(clean mask, clean probability) of items whose losses are given.

    With ``groups`` (the given label of each item) the mixture is fitted within each group: a model
    that leans towards one class gives that class's items smaller losses, and one mixture over all
    items would then call most of the other classes noisy and starve them of training signal.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if groups is None:
        prob = clean_probability(losses, seed)
    else:
        prob = np.ones_like(losses)
        for group in np.unique(groups):
            members = groups == group
            prob[members] = clean_probability(losses[members], seed)
    return prob > threshold, prob

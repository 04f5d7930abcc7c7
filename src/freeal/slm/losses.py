"""The consistency loss both SLMs share: symmetric KL between two views' sharpened predictions."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _sharpen(p: torch.Tensor, temperature: float) -> torch.Tensor:
    p = p ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from each view's sharpened (detached) prediction to the other view's prediction, averaged."""
    log_a, log_b = F.log_softmax(logits_a, 1), F.log_softmax(logits_b, 1)
    target_a = _sharpen(log_a.exp().detach(), temperature)
    target_b = _sharpen(log_b.exp().detach(), temperature)
    return 0.5 * (
        F.kl_div(log_b, target_a, reduction="batchmean") + F.kl_div(log_a, target_b, reduction="batchmean")
    )

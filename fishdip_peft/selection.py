"""Exact global top-K over many score tensors, without concatenating them.

The K largest scores are found by a two-pass radix select on the IEEE bit patterns of the
(non-negative, finite) float32 scores: a histogram of the high 16 bits locates the bucket holding
the K-th largest score, a histogram of the low 16 bits inside that bucket gives it exactly. Ties at
the threshold are broken by position: the entry with the lower flat index (tensors in order, then
row-major) wins, so the selection is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_BUCKETS = 1 << 16


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """Monotone int32 keys of non-negative float32 scores (int64 to keep shifts simple)."""
    return scores.detach().reshape(-1).to(torch.float32).view(torch.int32).to(torch.int64)


def _kth_bucket(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """Bucket holding the k-th largest entry, and how many entries lie in higher buckets."""
    above = torch.flip(torch.cumsum(torch.flip(histogram, [0]), 0), [0]) - histogram
    bucket = int(torch.nonzero((above < k) & (above + histogram >= k)).max())
    return bucket, int(above[bucket])


def global_topk_indices(scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Indices of the `k` largest entries over all `scores`, per tensor, sorted ascending (int64).

    Scores must be finite and non-negative (Fisher information is). Ties are broken towards the
    lower flat index.
    """
    total = sum(s.numel() for s in scores)
    if not 0 < k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}.")
    for s in scores:
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError("scores must be finite and non-negative.")

    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for s in scores:
        high += torch.bincount((_keys(s) >> 16).cpu(), minlength=_BUCKETS)
    high_bucket, above_high = _kth_bucket(high, k)

    low = torch.zeros(_BUCKETS, dtype=torch.int64)
    for s in scores:
        keys = _keys(s)
        low += torch.bincount((keys[(keys >> 16) == high_bucket] & 0xFFFF).cpu(), minlength=_BUCKETS)
    low_bucket, above_low = _kth_bucket(low, k - above_high)

    threshold = (high_bucket << 16) | low_bucket
    ties_needed = k - above_high - above_low
    selected = []
    for s in scores:
        keys = _keys(s)
        ties = torch.nonzero(keys == threshold).flatten()[:ties_needed]
        ties_needed -= ties.numel()
        chosen = torch.cat([torch.nonzero(keys > threshold).flatten(), ties])
        selected.append(torch.sort(chosen).values)
    return selected

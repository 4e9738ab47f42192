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
    # The int32 bit patterns of non-negative float32 values are ordered like the values (no copy for
    # float32); negative floats have negative keys, +inf and NaN keys of 0x7F800000 and above.
    keys = [s.detach().reshape(-1).to(torch.float32).view(torch.int32) for s in scores]
    for key in keys:
        low, high = torch.aminmax(key)
        if int(low) < 0 or int(high) >= 0x7F800000:
            raise ValueError("scores must be finite and non-negative.")

    high = torch.zeros(_BUCKETS, dtype=torch.int64)
    for key in keys:
        high += torch.bincount((key >> 16).cpu(), minlength=_BUCKETS)
    high_bucket, above_high = _kth_bucket(high, k)

    lo, hi = high_bucket << 16, (high_bucket + 1) << 16
    low = torch.zeros(_BUCKETS, dtype=torch.int64)
    for key in keys:
        low += torch.bincount((key[(key >= lo) & (key < hi)] - lo).cpu(), minlength=_BUCKETS)
    low_bucket, above_low = _kth_bucket(low, k - above_high)

    threshold = lo | low_bucket
    ties_needed = k - above_high - above_low
    selected = []
    for key in keys:
        chosen = torch.nonzero(key > threshold).flatten()
        if ties_needed > 0:
            ties = torch.nonzero(key == threshold).flatten()[:ties_needed]
            ties_needed -= ties.numel()
            chosen = torch.sort(torch.cat([chosen, ties])).values
        selected.append(chosen)
    return selected

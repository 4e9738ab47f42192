"""The regressing pool: the training samples whose Fisher ranks the weights at the next refresh."""

from __future__ import annotations

import heapq
import random
from collections.abc import Mapping
from typing import Any

import torch


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Leading size shared by every tensor of a model-input dict (error if they disagree)."""
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError("the batch holds no tensor; pass the model-input dict of the step (input_ids, labels, ...).")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the batch's tensors disagree on the batch size: {sizes}.")
    return next(iter(sizes.values()))


def slice_sample(batch: Mapping[str, Any], row: int) -> dict[str, Any]:
    """Detached copy of one sample of a batch, keeping a leading dimension of 1."""
    return {
        k: v[row : row + 1].detach().clone() if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


class RegressingPool:
    """Keeps `capacity` samples seen since the last refresh: the highest-loss ones (sample-aware) or a
    uniform random reservoir (the paper's ablation). Ties in loss keep the earlier sample."""

    def __init__(self, capacity: int, sample_aware: bool = True, seed: int = 0):
        self.capacity = capacity
        self.sample_aware = sample_aware
        self._rng = random.Random(seed)
        self._entries: list[tuple[float, int, dict[str, Any]]] = []  # (key, -arrival, sample), min-heap
        self._seen = 0

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Consider every sample of `batch` (one loss each); only entering samples are copied."""
        for row, loss in enumerate(losses.detach().float().cpu().tolist()):
            self._seen += 1
            key = loss if self.sample_aware else self._rng.random()
            entry = (key, -self._seen)
            if len(self._entries) < self.capacity:
                heapq.heappush(self._entries, (*entry, slice_sample(batch, row)))
            elif entry > self._entries[0][:2]:
                heapq.heapreplace(self._entries, (*entry, slice_sample(batch, row)))

    def losses(self) -> list[float]:
        return [key for key, _, _ in sorted(self._entries, reverse=True)] if self.sample_aware else []

    def keys(self) -> list[tuple[float, int]]:
        """`(key, -arrival)` of the pooled samples, in the order `drain()` returns them."""
        return sorted((entry[:2] for entry in self._entries), reverse=True)

    def reseed(self, seed: int) -> None:
        """Restart the random keys of the uniform pool (`sample_aware=False`) from `seed`."""
        self._rng = random.Random(seed)

    def drain(self) -> list[dict[str, Any]]:
        """The pooled samples, highest key first; empties the pool."""
        samples = [sample for _, _, sample in sorted(self._entries, key=lambda e: e[:2], reverse=True)]
        self._entries.clear()
        self._seen = 0
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {"entries": list(self._entries), "seen": self._seen, "rng": self._rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._entries = list(state["entries"])
        heapq.heapify(self._entries)
        self._seen = state["seen"]
        self._rng.setstate(state["rng"])

"""The regressing pool: the training samples whose Fisher ranks the weights at the next refresh.

The pool ranks *distinct* samples by their *latest* loss: a sample offered again replaces its
earlier entry, whatever that entry's loss, so the pool holds the samples the model gets most wrong
now, not the stale losses of earlier steps, and one sample never fills two slots.

Sample identity is the sample's content (`sample_identity`): the SHA-1 of every tensor of its
model-input dict, padding left out. The same sentence in two batches padded to different widths is
one sample; two identical rows of a data set are one sample too.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any

import torch

from .losses import IGNORE_INDEX


def batch_size_of(batch: Mapping[str, Any]) -> int:
    """Leading size shared by every tensor of a model-input dict (error if they disagree)."""
    sizes = {k: v.shape[0] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if not sizes:
        raise ValueError("the batch holds no tensor; pass the model-input dict of the step (input_ids, labels, ...).")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the batch's tensors disagree on the batch size: {sizes}.")
    return next(iter(sizes.values()))


def slice_sample(batch: Mapping[str, Any], row: int, copy: bool = True) -> dict[str, Any]:
    """One sample of a batch, keeping a leading dimension of 1: a detached copy, or views (`copy=False`)."""
    return {
        k: (v[row : row + 1].detach().clone() if copy else v[row : row + 1])
        if isinstance(v, torch.Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def _unpadded(name: str, tensor: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """`tensor` (one sample, leading size 1) without its padding positions."""
    if kept is not None and tensor.dim() >= 2 and tensor.shape[1] == kept.numel():
        return tensor[:, kept]
    if name == "labels" and tensor.dim() == 2:  # seq2seq labels: trailing ignore-index padding
        counted = torch.nonzero(tensor[0] != IGNORE_INDEX)
        return tensor[:, : int(counted.max()) + 1] if counted.numel() else tensor[:, :0]
    return tensor


def sample_identity(sample: Mapping[str, Any]) -> bytes:
    """Content hash of one sample (a model-input dict with leading size 1), blind to padding.

    Positions where `attention_mask` is 0 are left out of every tensor aligned with it (left or right
    padding), and trailing ignore-index positions out of unaligned `labels`.
    """
    mask = sample.get("attention_mask")
    kept = mask[0].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    digest = hashlib.sha1()
    for name in sorted(sample):
        value = sample[name]
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            value = _unpadded(name, value.detach(), kept)
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            digest.update(repr(value).encode())
    return digest.digest()


class RegressingPool:
    """The `capacity` distinct samples with the highest latest key: the loss (sample-aware) or a
    uniform random draw (the paper's ablation). Ties keep the earlier arrival.

    Memory is bounded: the pool holds the tensors of at most `capacity` samples. A sample that falls
    out of the top (its loss dropped, or better ones arrived) is forgotten until it is offered again.
    """

    def __init__(self, capacity: int, sample_aware: bool = True, seed: int = 0):
        self.capacity = capacity
        self.sample_aware = sample_aware
        self._rng = random.Random(seed)
        self._entries: dict[bytes, tuple[float, int, dict[str, Any]]] = {}  # identity -> (key, -arrival, sample)
        self._seen = 0

    def __len__(self) -> int:
        return len(self._entries)

    def offer(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Consider every sample of `batch` (one loss each); only entering samples are copied."""
        for row, loss in enumerate(losses.detach().float().cpu().tolist()):
            self._seen += 1
            identity = sample_identity(slice_sample(batch, row, copy=False))
            key = (loss if self.sample_aware else self._rng.random(), -self._seen)
            if identity in self._entries:
                self._entries[identity] = (*key, self._entries[identity][2])
            elif len(self._entries) < self.capacity:
                self._entries[identity] = (*key, slice_sample(batch, row))
            else:
                lowest = min(self._entries, key=lambda i: self._entries[i][:2])
                if key > self._entries[lowest][:2]:
                    del self._entries[lowest]
                    self._entries[identity] = (*key, slice_sample(batch, row))

    def _ranked(self) -> list[tuple[float, int, dict[str, Any]]]:
        return sorted(self._entries.values(), key=lambda e: e[:2], reverse=True)

    def losses(self) -> list[float]:
        """Losses of the pooled samples, highest first (empty if not sample-aware)."""
        return [key for key, _, _ in self._ranked()] if self.sample_aware else []

    def keys(self) -> list[tuple[float, int]]:
        """`(key, -arrival)` of the pooled samples, in the order `drain()` returns them."""
        return [entry[:2] for entry in self._ranked()]

    def reseed(self, seed: int) -> None:
        """Restart the random keys of the uniform pool (`sample_aware=False`) from `seed`."""
        self._rng = random.Random(seed)

    def clear(self) -> None:
        """Forget every pooled sample."""
        self._entries.clear()
        self._seen = 0

    def drain(self) -> list[dict[str, Any]]:
        """The pooled samples, highest key first; empties the pool."""
        samples = [sample for _, _, sample in self._ranked()]
        self.clear()
        return samples

    def state_dict(self) -> dict[str, Any]:
        return {"entries": self._ranked(), "seen": self._seen, "rng": self._rng.getstate()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._entries = {sample_identity(sample): (key, arrival, sample) for key, arrival, sample in state["entries"]}
        self._seen = state["seen"]
        self._rng.setstate(state["rng"])

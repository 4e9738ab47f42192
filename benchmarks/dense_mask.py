"""The original FISH-DIP code's training style, re-implemented as the efficiency benchmark's baseline.

The official FISH-DIP code (built on the FISH-mask code of Sung et al. 2021) keeps, for every weight:

- a dense float32 mask (`torch.zeros_like(tensors)` over all of θ, then reshaped views per weight);
- at a refresh, a dense float32 gradient dictionary (`torch.zeros_like(param)` per weight), filled by a
  batch-size-1 loop over the selected samples (`loss.backward()`, then `grads[name] += param.grad ** 2`,
  `model.zero_grad()`), then `torch.cat` of all of it and one global `torch.topk`;
- during training, every parameter trainable: after `backward()` each dense gradient is multiplied by
  its dense mask (`param.grad.data.copy_(param.grad.data * mask[name])`) and an optimizer over all
  weights steps (here AdamW with weight_decay=0; momentum from an earlier mask still moves entries that
  left it, as in the original);
- the model runs in its training mode while ranking and the checkpoint is the full dense model.

`DenseMaskFishDip` mirrors `FishDipModel.step()`: call `step(losses, batch)` once per optimizer step
(after the forward pass, before `backward()`); call `mask_gradients()` after `backward()`.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class DenseMaskFishDip:
    """Dense-mask FISH-DIP over every parameter of `model` (tied weights once)."""

    def __init__(self, model: nn.Module, density: float = 0.01, update_every: int = 100, num_regressing: int = 15):
        self.model = model
        self.density = density
        self.update_every = update_every
        self.num_regressing = num_regressing
        self.named = list(model.named_parameters())  # named_parameters() yields a tied weight once
        for _, param in self.named:
            param.requires_grad_(True)
        self.keep = int(sum(p.numel() for _, p in self.named) * density)
        self.mask: dict[str, torch.Tensor] = {}
        self._pool: list[tuple[float, int, dict[str, Any]]] = []
        self._seen = 0
        self._calls = 0

    # -- the regressing pool (highest-loss samples since the last refresh) -------------------------
    def _offer(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        for row, loss in enumerate(losses.detach().float().cpu().tolist()):
            self._seen += 1
            sample = {k: v[row : row + 1].detach().clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
            entry = (loss, -self._seen, sample)
            if len(self._pool) < self.num_regressing:
                heapq.heappush(self._pool, entry)
            elif entry[:2] > self._pool[0][:2]:
                heapq.heapreplace(self._pool, entry)

    def step(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> bool:
        """Pool this step's samples; build the mask at the first call and every `update_every` calls."""
        self._offer(losses, batch)
        self._calls += 1
        if self._calls == 1 or (self._calls - 1) % self.update_every == 0:
            self.refresh()
            return True
        return False

    # -- the original code's mask computation -------------------------------------------------------
    def _importance(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        gradients_dict = {name: torch.zeros_like(param) for name, param in self.named}
        for sample in samples:  # batch size 1, the model in its training mode (dropout active)
            loss = self.model(**sample).loss
            loss.backward()
            for name, param in self.named:
                gradients_dict[name] += torch.square(param.grad).data
            self.model.zero_grad()
        return gradients_dict

    def refresh(self) -> None:
        samples = [entry[2] for entry in sorted(self._pool, key=lambda e: e[:2], reverse=True)]
        self._pool, self._seen = [], 0
        importances = self._importance(samples)
        sizes, tensors = {}, []
        for name, value in importances.items():
            sizes[name] = value.shape
            tensors.append(value.view(-1))
        tensors = torch.cat(tensors, 0)
        top_pos = torch.topk(tensors, self.keep)[1]
        masks = torch.zeros_like(tensors)
        masks[top_pos] = 1
        del tensors, importances, top_pos
        self.mask, offset = {}, 0
        for name, shape in sizes.items():
            end = offset + shape.numel()
            self.mask[name] = masks[offset:end].reshape(shape)
            offset = end

    def mask_gradients(self) -> None:
        """Zero the gradient outside the mask (a dense multiply per weight), as the original trainer does."""
        for name, param in self.named:
            if param.grad is not None:
                param.grad.data.copy_(param.grad.data * self.mask[name].data)

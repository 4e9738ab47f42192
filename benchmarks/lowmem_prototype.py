"""Prototype (benchmark only): the two avoidable parts of a FISH-DIP training step's peak memory.

1. `forward_with_per_sample_losses_fused`: the same per-sample and batch losses as
   `fishdip_peft.forward_with_per_sample_losses`, but the cross-entropy is a custom autograd function that
   keeps only the logits (which the model returns anyway) and a per-token log-sum-exp. The core's version
   (and transformers' own loss) materialises several tensors of the logits' size (batch x length x vocab:
   94.5 MiB for SmolLM2 at 8 x 64 in fp32): log_softmax's saved output, the NLL gradient, the log_softmax
   gradient, and the zero-filled gradient of the shifted slice. Here the backward writes softmax - onehot
   into one gradient tensor, a chunk of rows at a time. Labels are shifted instead of logits, so no copy.
2. `drop_flat_mask_buffer`: the flat boolean mask buffer holds |θ| bytes (128 MiB for 135M weights) although
   the per-tensor sorted indices already define it; dropping it simulates a core that derives `mask` on
   demand. (Only for measuring: a refresh would fail afterwards.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

IGNORE_INDEX = -100


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of `logits` (N, V) against `targets` (N,), 0 where target == ignore_index."""

    @staticmethod
    def forward(ctx, logits, targets, chunk: int):
        rows = logits.shape[0]
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        for start in range(0, rows, chunk):
            lse[start : start + chunk] = torch.logsumexp(logits[start : start + chunk].float(), dim=-1)
        valid = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.chunk = chunk
        return torch.where(valid, lse - picked, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_loss.float(), torch.zeros_like(grad_loss, dtype=torch.float32))
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp(logits[rows].float() - lse[rows, None])
            probs.scatter_add_(1, safe[rows, None], -torch.ones_like(lse[rows, None]))
            probs.mul_(scale[rows, None])
            grad[rows] = probs.to(grad.dtype)
        return grad, None, None


def forward_with_per_sample_losses_fused(model, batch: Mapping[str, Any], chunk: int = 64):
    """Causal LMs only: `(outputs, per_sample_losses)` with `outputs.loss` the token-mean batch loss."""
    inputs = dict(batch)
    labels = inputs.pop("labels")
    outputs = model(**inputs)
    logits = outputs.logits
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]  # shift the labels, not the logits: no copy of the logits
    token = _TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device), chunk)
    token = token.view(labels.shape)
    counted = (targets != IGNORE_INDEX).to(token.device)
    outputs.loss = token.sum() / counted.sum().clamp(min=1)
    return outputs, token.sum(1) / counted.sum(1).clamp(min=1)


def drop_flat_mask_buffer(peft_model) -> int:
    """Free the |θ|-byte flat mask buffer (measurement only); returns the bytes freed."""
    state = peft_model.base_model.fishdip_state
    freed = state.mask.numel() * state.mask.element_size()
    state.mask = torch.empty(0, dtype=torch.bool, device=state.mask.device)
    return freed

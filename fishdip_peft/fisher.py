"""Empirical Fisher information of a set of samples, one backward pass per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


def trim_right_padding(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the trailing padded positions of a one-sample, right-padded causal-LM input.

    Only tensors whose second dimension is the attention mask's length are cut; with right padding
    the result of the forward pass on the kept positions is unchanged.
    """
    mask = sample.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != 1:
        return dict(sample)
    length = int(mask[0].sum())
    if length == 0 or length == mask.shape[1] or not bool(mask[0, :length].all()):
        return dict(sample)
    full = mask.shape[1]
    return {
        k: v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == full else v
        for k, v in sample.items()
    }


def empirical_fisher(
    model: nn.Module, samples: Sequence[Mapping[str, Any]], parameters: Sequence[nn.Parameter], *, mean: bool = True
) -> list[torch.Tensor]:
    """F = (1/n) Σ_i (∇ ℓ_i)² for each of `parameters`, as float32 tensors of their shapes (the sum
    Σ_i (∇ ℓ_i)² with `mean=False`, zeros when there is no sample).

    Each sample is a model-input dict with a leading batch size of 1 whose forward pass returns the
    sample's loss (`outputs.loss`, i.e. it holds `labels`). The model runs in eval mode (no dropout);
    its training flags, the parameters' `requires_grad` and `.grad` are restored afterwards. Only one
    dense gradient exists at a time: each is squared into its score as soon as it is complete.
    """
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters]
    saved = [(p.requires_grad, p.grad) for p in parameters]
    training = [(m, m.training) for m in model.modules()]
    handles = []

    def square_into(score: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            score.addcmul_(grad, grad)
            param.grad = None

        return hook

    try:
        model.eval()
        for param, score in zip(parameters, scores):
            param.grad = None
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(square_into(score)))
        for sample in samples:
            with torch.enable_grad():
                loss = model(**sample).loss
            if loss is None:
                raise ValueError("the model returned no loss: the samples passed to step() need `labels`.")
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"a pooled sample has a non-finite loss ({loss.detach().item()}).")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for param, (requires_grad, grad) in zip(parameters, saved):
            param.requires_grad_(requires_grad)
            param.grad = grad
        for module, was_training in training:
            module.training = was_training
    if mean and samples:
        for score in scores:
            score.div_(len(samples))
    return scores

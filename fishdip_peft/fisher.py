"""Empirical Fisher information of a set of samples: per-sample gradients squared and summed."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .losses import IGNORE_INDEX, sample_losses
from .per_sample import BatchedSquaredGradients, CannotBatch


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


_PAD_VALUES = {"attention_mask": 0, "decoder_attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0,
               "position_ids": 0, "decoder_input_ids": 0}


def collate_samples(samples: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """One right-padded batch of one-sample inputs, or None where padding would change a sample's result.

    Tensors of equal shapes are concatenated. Sequences of different lengths are padded on the right for
    the keys whose padding is inert: masks with 0, `labels` with the ignore index, ids with 0 (the
    `input_ids` only when an `attention_mask` masks them out; decoders are causal).
    """
    keys = list(samples[0])
    if any(list(s) != keys for s in samples):
        return None
    padded = dict(_PAD_VALUES)
    if "attention_mask" in keys:
        padded["input_ids"] = 0
    batch = {}
    for key in keys:
        values = [s[key] for s in samples]
        if not all(isinstance(v, torch.Tensor) for v in values):
            if any(v is not values[0] and v != values[0] for v in values):
                return None
            batch[key] = values[0]
            continue
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) == 1:
            batch[key] = torch.cat(values)
            continue
        if key not in padded or any(v.dim() != 2 or v.shape[0] != 1 for v in values):
            return None
        length = max(v.shape[1] for v in values)
        batch[key] = torch.cat([F.pad(v, (0, length - v.shape[1]), value=padded[key]) for v in values])
    return batch


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run `model` in eval mode (no dropout), then give every module back its own training flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def empirical_fisher(
    model: nn.Module, samples: Sequence[Mapping[str, Any]], parameters: Sequence[nn.Parameter], *, mean: bool = True,
    autocast_dtype: Optional[torch.dtype] = None, batch_size: int = 1,
) -> list[torch.Tensor]:
    """F = (1/n) Σ_i (∇ ℓ_i)² for each of `parameters`, as float32 tensors of their shapes (the sum
    Σ_i (∇ ℓ_i)² with `mean=False`, zeros when there is no sample).

    Each sample is a model-input dict with a leading batch size of 1 whose forward pass returns the
    sample's loss (`outputs.loss`, i.e. it holds `labels`). The model runs in eval mode (no dropout);
    its training flags, the parameters' `requires_grad` and `.grad` are restored afterwards.

    With `batch_size=1` each sample gets its own forward and backward, and each dense gradient is
    squared into its score as soon as it is complete. With a larger `batch_size` the samples run that
    many at a time as one padded batch whose per-sample gradients are formed layer by layer
    (`per_sample.BatchedSquaredGradients`): the same scores within float32 rounding, fewer and larger
    matrix products, and the activations of a whole batch alive at once. A batch that cannot reproduce
    each sample's own loss (inputs that cannot be padded, a module not batched on the first dimension, a
    model whose loss is not the mean of its per-sample losses) runs one sample at a time.
    `autocast_dtype` (e.g. torch.bfloat16) runs the passes under autocast (opt-in, approximate); the
    scores are accumulated in float32.
    """
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters]
    if not samples:
        return scores
    device = parameters[0].device.type
    autocast = (lambda: torch.autocast(device_type=device, dtype=autocast_dtype)) if autocast_dtype else nullcontext
    saved = [(p.requires_grad, p.grad) for p in parameters]
    try:
        with eval_mode(model):
            for start in range(0, len(samples), max(1, batch_size)):
                chunk = samples[start:start + max(1, batch_size)]
                batch = collate_samples(chunk) if len(chunk) > 1 else None
                try:
                    if batch is None:
                        raise CannotBatch("one sample, or samples that cannot form one batch")
                    _batched(model, batch, len(chunk), parameters, scores, autocast)  # refuses before adding any
                except CannotBatch:
                    _one_at_a_time(model, chunk, parameters, scores, autocast)
    finally:
        for param, (requires_grad, grad) in zip(parameters, saved):
            param.requires_grad_(requires_grad)
            param.grad = grad
    if mean:
        for score in scores:
            score.div_(len(samples))
    return scores


def _check_loss(loss: Optional[torch.Tensor]) -> None:
    if loss is None:
        raise ValueError("the model returned no loss: the samples passed to step() need `labels`.")
    if not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(f"a pooled sample has a non-finite loss ({loss.detach().tolist()}).")


def _batched(model, batch, n, parameters, scores, autocast) -> None:
    for param in parameters:
        param.grad = None
        param.requires_grad_(False)
    with BatchedSquaredGradients(model, parameters, scores, n, autocast) as squares:
        with torch.enable_grad(), autocast():
            outputs = model(**batch)
        _check_loss(outputs.loss)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else None
        if logits is None:
            raise CannotBatch("the model returns no logits")
        try:
            with torch.enable_grad():
                losses, weights = sample_losses(model, logits, batch["labels"])
        except ValueError as error:
            raise CannotBatch(str(error)) from None
        _check_loss(losses)
        mean = (losses.detach() * weights).sum() / weights.sum().clamp(min=1)
        if not torch.allclose(mean, outputs.loss.detach().float(), rtol=1e-3, atol=1e-5):
            raise CannotBatch("the model's loss is not the mean of the per-sample losses")
        if losses.requires_grad:
            losses.sum().backward()
        squares.finish()


def _one_at_a_time(model, samples, parameters, scores, autocast) -> None:
    """One forward and backward per sample; each dense gradient is squared into its score when complete."""
    handles = []

    def square_into(score: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad.float()
            score.addcmul_(grad, grad)
            param.grad = None

        return hook

    try:
        for param, score in zip(parameters, scores):
            param.grad = None
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(square_into(score)))
        for sample in samples:
            with torch.enable_grad(), autocast():
                loss = model(**sample).loss
            _check_loss(loss)
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()

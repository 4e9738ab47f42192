"""Per-sample losses for causal and sequence-to-sequence language models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_losses(logits: torch.Tensor, labels: torch.Tensor, *, causal: bool, ignore_index: int = IGNORE_INDEX):
    """Cross-entropy of every target token, shape (batch, length), and the mask of counted tokens.

    For causal models the logits at position t predict the label at t + 1 (the shift transformers
    applies; the labels are shifted, so contiguous logits are not copied, and the last position counts
    zero); seq2seq logits are aligned with their labels. Tokens labelled `ignore_index` count zero.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (batch, length, vocab) and labels (batch, length), got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}."
        )
    labels = labels.to(logits.device)
    if causal:
        labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(labels.shape)
    return losses, labels != ignore_index


def per_sample_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, causal: bool, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean loss over each sample's target tokens (labels other than `ignore_index`), shape (batch,).

    A sample without any target token has loss 0. Without a gradient to keep, the samples are done one at
    a time, so the only temporary of the logits' size is one sample's.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        losses, counted = token_losses(logits, labels, causal=causal, ignore_index=ignore_index)
        return losses.sum(1) / counted.sum(1).clamp(min=1)
    with torch.no_grad():
        token_losses(logits[:0], labels[:0], causal=causal, ignore_index=ignore_index)  # the shape check
        rows = [token_losses(logits[i:i + 1], labels[i:i + 1], causal=causal, ignore_index=ignore_index)
                for i in range(logits.shape[0])]
        return torch.cat([(losses.sum(1) / counted.sum(1).clamp(min=1)) for losses, counted in rows])


def is_causal_lm(model) -> bool:
    """Whether `model`'s logits at position t predict the label at t + 1 (not for seq2seq or masked LMs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return not type(base).__name__.endswith("ForMaskedLM")


def forward_with_per_sample_losses(model, batch: Mapping[str, Any], ignore_index: int = IGNORE_INDEX):
    """Run `model` on `batch` (which must hold `labels`) and return `(outputs, per_sample_losses)`.

    `outputs.loss` is the usual token-level mean over the batch (what transformers computes), so the
    step trains exactly as without FISH-DIP; the per-sample losses come from the same logits at no
    extra forward cost. Works for causal LMs and encoder-decoder models such as T5.
    """
    if "labels" not in batch:
        raise ValueError("the batch needs `labels` (ignore_index for tokens that are not targets).")
    inputs = dict(batch)
    labels = inputs.pop("labels")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    causal = is_causal_lm(base)
    if getattr(base.config, "is_encoder_decoder", False) and "decoder_input_ids" not in inputs:
        inputs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
    outputs = model(**inputs)
    losses, counted = token_losses(outputs.logits, labels, causal=causal, ignore_index=ignore_index)
    outputs.loss = losses.sum() / counted.sum().clamp(min=1)
    return outputs, losses.sum(1) / counted.sum(1).clamp(min=1)


def per_sample_losses_from_outputs(model, outputs, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample losses (1-D, detached) from a model's outputs and the batch's labels.

    Language models (logits `(batch, length, vocab)`): mean cross-entropy over each sample's target
    tokens (labels other than -100), shifted for causal models. Sequence classification (logits
    `(batch, classes)`): cross-entropy, or squared error for one-output regression.
    """
    logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
    return sample_losses(model, logits.detach(), labels)[0]


def sample_losses(model, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(losses, weights)`: each sample's loss (see `per_sample_losses_from_outputs`; differentiable if the
    logits are) and its weight in the batch's mean loss (its number of target tokens, or 1)."""
    labels = labels.to(logits.device)
    if logits.dim() == 3:
        losses = per_sample_losses(logits, labels, causal=is_causal_lm(model), ignore_index=IGNORE_INDEX)
        counted = labels != IGNORE_INDEX
        if is_causal_lm(model):
            counted = counted[:, 1:]
        return losses, counted.sum(1).to(losses.dtype)
    if logits.dim() == 2 and labels.dim() == 1:
        if logits.shape[1] == 1 and labels.is_floating_point():
            losses = (logits[:, 0].float() - labels.float()) ** 2
        else:
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
        return losses, torch.ones_like(losses)
    raise ValueError(
        f"cannot derive per-sample losses from logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; "
        "override FishDipTrainer.per_sample_losses for this model."
    )

"""Prototype (benchmark only): cheaper mask refreshes, to measure what the proposed core patches gain.

Three independent changes to `fishdip_peft.fisher.empirical_fisher` / `fishdip_peft.selection`:

1. `sparse_embeddings` (exact): during the Fisher pass every `nn.Embedding` whose weight is scored returns a
   sparse gradient (the rows of the sample's tokens) instead of `embedding_dense_backward`'s dense
   (vocab x hidden) tensor, which costs a zero-fill, an index_add and, for a tied LM head, a dense add per
   sample. Duplicate rows are summed (`coalesce`) before squaring, so the score is unchanged.
2. `fast_global_topk_indices` (exact, same tie-breaking; now the core's `global_topk_indices`): the earlier core radix select converted every score
   tensor to int64 keys three times and checks finiteness twice more (isfinite, any, all over |θ|); here
   the int32 bit patterns are used as they are (monotone for non-negative floats) and the validity check
   is one min/max over the keys.
3. `autocast_dtype=torch.bfloat16` (approximate, an opt-in): the per-sample forward/backward runs under CPU
   autocast, so the matrix products run in bfloat16; scores are still accumulated in float32. The
   benchmark reports how much of the selected set it changes.

`patch_refresh(**options)` swaps these in where the core's refresh calls them (a context manager).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from fishdip_peft.selection import global_topk_indices as fast_global_topk_indices

def empirical_fisher(
    model: nn.Module, samples: Sequence[Mapping[str, Any]], parameters: Sequence[nn.Parameter], *, mean: bool = True,
    sparse_embeddings: bool = True, autocast_dtype: Optional[torch.dtype] = None,
) -> list[torch.Tensor]:
    """`fishdip_peft.fisher.empirical_fisher` with sparse embedding gradients and optional autocast."""
    scores = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters]
    saved = [(p.requires_grad, p.grad) for p in parameters]
    training = [(m, m.training) for m in model.modules()]
    scored = {id(p) for p in parameters}
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding) and id(m.weight) in scored]
    sparse_flags = [(m, m.sparse) for m in embeddings]
    handles = []

    def square_into(score: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if grad.is_sparse:
                grad = grad.coalesce()
                rows, vals = grad.indices()[0], grad.values().float()
                score.index_add_(0, rows, vals * vals)
            else:
                grad = grad.float()
                score.addcmul_(grad, grad)
            param.grad = None

        return hook

    try:
        model.eval()
        if sparse_embeddings:
            for module in embeddings:
                module.sparse = True
        for param, score in zip(parameters, scores):
            param.grad = None
            param.requires_grad_(True)
            handles.append(param.register_post_accumulate_grad_hook(square_into(score)))
        autocast = (torch.autocast(device_type=parameters[0].device.type, dtype=autocast_dtype)
                    if autocast_dtype is not None else contextlib.nullcontext())
        for sample in samples:
            with torch.enable_grad(), autocast:
                loss = model(**sample).loss
            if loss is None:
                raise ValueError("the model returned no loss: the samples passed to step() need `labels`.")
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"a pooled sample has a non-finite loss ({loss.detach().item()}).")
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in sparse_flags:
            module.sparse = flag
        for param, (requires_grad, grad) in zip(parameters, saved):
            param.requires_grad_(requires_grad)
            param.grad = grad
        for module, was_training in training:
            module.training = was_training
    if mean and samples:
        for score in scores:
            score.div_(len(samples))
    return scores


@contextlib.contextmanager
def patch_refresh(sparse_embeddings: bool = True, fast_topk: bool = True, autocast_dtype: Optional[torch.dtype] = None):
    """Use the prototype Fisher and/or top-K inside `FishDipModel.refresh_mask` while the context is open."""
    from benchmarks.efficiency.measure import rebound_in_core

    def fisher(model, samples, parameters, **kwargs):
        return empirical_fisher(model, samples, parameters, sparse_embeddings=sparse_embeddings,
                                autocast_dtype=autocast_dtype, **kwargs)

    with contextlib.ExitStack() as stack:
        stack.enter_context(rebound_in_core("empirical_fisher", lambda original: fisher))
        if fast_topk:
            stack.enter_context(rebound_in_core("global_topk_indices", lambda original: fast_global_topk_indices))
        yield

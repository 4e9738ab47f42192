"""Prototype (benchmark only): sampled weight gradients (SDDMM) for the Linear layers of a FISH-DIP model.

The core computes every tapped weight's dense gradient `grad_W = δᵀ x` (|W|·T multiply-adds and a transient
|W| tensor) and then gathers the K_W selected entries. For an `nn.Linear` only those entries are needed:
`grad_W[i, j] = Σ_t δ[t, i] · x[t, j]` for the selected (i, j) is a sampled dense-dense product (SDDMM),
K_W·T multiply-adds, which `torch.sparse.sampled_addmm` computes from a CSR pattern of the selected
positions (row-major flat indices are already CSR order). The input gradient is computed as for a frozen
layer. `enable_sampled_linear_grads(peft_model)` switches a `get_peft_model(..., FishDipConfig(...))` model
to this path without touching the core: it overrides `forward` of each Linear whose weight is eligible;
the core's tap on that weight is then simply unused (its backward never runs). Other weights (embeddings,
norms) keep the core's dense path; a tied embedding/LM-head weight gets both contributions, summed in
`values.grad`. The positions are read in the backward, as in the core, so a mask refreshed between the
forward and the backward applies.

This is a measurement prototype for the efficiency benchmark and a proposed core patch, not library code.
"""

from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class _Patterns:
    """CSR patterns (zero values) of each slot's selected positions, rebuilt when the selection changes."""

    def __init__(self):
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, slot) -> torch.Tensor:
        hit = self._cache.get(id(slot))
        if hit is not None and hit[0] is slot.index:
            return hit[1]
        rows_out, cols_in = slot.param.shape
        index = slot.index
        crow = torch.zeros(rows_out + 1, dtype=torch.int64, device=index.device)
        crow[1:] = torch.bincount(index // cols_in, minlength=rows_out).cumsum(0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            pattern = torch.sparse_csr_tensor(
                crow, index % cols_in, torch.zeros(index.numel(), dtype=torch.float32, device=index.device),
                (rows_out, cols_in), check_invariants=False,
            )
        self._cache[id(slot)] = (index, pattern)
        return pattern


class _SampledLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W frozen; backward: the input gradient, and W's gradient only at the slot's positions."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, slot, state, patterns):
        ctx.save_for_backward(x, weight)
        ctx.slot, ctx.state, ctx.patterns = slot, state, patterns
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        slot, state = ctx.slot, ctx.state
        if slot.index.numel():
            d2 = grad_out.reshape(-1, grad_out.shape[-1]).to(torch.float32)
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
            picked = torch.sparse.sampled_addmm(ctx.patterns.get(slot), d2.t(), x2, beta=0.0).values()
            if state.values.grad is None:
                state.values.grad = torch.zeros_like(state.values)
            state.values.grad[slot.value_range()] += picked.to(state.values.device)
        return grad_x, None, grad_bias, None, None, None, None


def enable_sampled_linear_grads(peft_model) -> int:
    """Route the eligible `nn.Linear` weights of a FISH-DIP peft model through `_SampledLinear`.

    Returns the number of Linear modules switched.
    """
    tuner = peft_model.base_model
    state = tuner.fishdip_state
    slot_of = {id(slot.param): slot for slot in state.slots}
    patterns = _Patterns()
    switched = 0
    for module in tuner.model.modules():
        if type(module) is not nn.Linear or id(module.weight) not in slot_of:
            continue
        slot = slot_of[id(module.weight)]

        def forward(self, x, _slot=slot):
            sampled = tuner._taps_active() and (_slot.index.numel() or tuner._refresh_due(tuner._steps + 1))
            if not sampled:
                return F.linear(x, self.weight, self.bias)
            return _SampledLinear.apply(x, _slot.param, self.bias, state.values, _slot, state, patterns)

        module.forward = types.MethodType(forward, module)
        switched += 1
    return switched

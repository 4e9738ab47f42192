"""Compact training state: one flat vector of the K trainable values and where they live.

The optimizer sees only `values` (K float32 entries, the same tensor across mask refreshes), so its
state is O(K) and nothing it does (momentum, weight decay) can reach a frozen entry. The model's
weights stay ordinary frozen tensors that always hold the trained values: gradients reach `values`
through `GradientTap`, and `write_back` copies `values` into the weights after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@dataclass
class ParamSlot:
    """One eligible weight tensor and its share of the mask."""

    name: str
    param: nn.Parameter
    flat_offset: int  # position of the tensor's first entry in the flat mask
    index: torch.Tensor = field(default=None)  # sorted int64 positions (within the tensor) that are trainable
    value_offset: int = 0  # where the tensor's trainable entries start in `values`
    touched: torch.Tensor = field(default=None)  # sorted int64 positions that were ever trainable
    base: torch.Tensor = field(default=None)  # base (pre-training) values at `touched`, in the weight dtype

    def __post_init__(self):
        if not self.param.is_contiguous():
            raise ValueError(f"FISH-DIP needs contiguous weights; '{self.name}' is not (call .contiguous() first).")
        empty = torch.empty(0, dtype=torch.int64, device=self.param.device)
        self.index = empty if self.index is None else self.index
        self.touched = empty.clone() if self.touched is None else self.touched
        self.base = torch.empty(0, dtype=self.param.dtype, device=self.param.device) if self.base is None else self.base

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def flat(self) -> torch.Tensor:
        return self.param.data.view(-1)

    def value_range(self) -> slice:
        return slice(self.value_offset, self.value_offset + self.index.numel())

    def follow_device(self) -> None:
        """Move the index tensors to the weight's device (after `model.to(...)`)."""
        device = self.param.device
        if self.index.device != device:
            self.index, self.touched, self.base = (t.to(device) for t in (self.index, self.touched, self.base))

    def record_base(self, positions: torch.Tensor) -> None:
        """Remember the base values of `positions` that were never trainable before."""
        if positions.numel() == 0:
            return
        if self.touched.numel():
            found = torch.searchsorted(self.touched, positions).clamp(max=self.touched.numel() - 1)
            positions = positions[self.touched[found] != positions]
        if positions.numel() == 0:
            return
        touched = torch.cat([self.touched, positions])
        base = torch.cat([self.base, self.flat[positions]])
        order = torch.argsort(touched)
        self.touched, self.base = touched[order], base[order]


class GradientTap(torch.autograd.Function):
    """Identity on a frozen weight whose backward adds the weight gradient's trainable entries to
    `values.grad`. The positions are read when the backward runs, so a mask refreshed between the
    forward and the backward applies to that step's update."""

    @staticmethod
    def forward(ctx, weight, values, slot, state):
        ctx.slot, ctx.state = slot, state
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        ctx.state.accumulate_grad(ctx.slot, grad_weight)
        return None, None, None, None


class SparseTrainingState(nn.Module, BaseTunerLayer):
    """The trainable `values` (K,), the flat boolean `mask` over all eligible entries, and the slots.

    It is the tuner's one adapter layer (peft's `BaseTunerLayer`), holding `values` as
    `fishdip_values[adapter_name]`, so peft's trainable-parameter counts and status reports see it.
    """

    adapter_layer_names = ("fishdip_values",)

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], k: int, trainable: bool, adapter_name: str):
        super().__init__()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.slots: list[ParamSlot] = []
        offset = 0
        for name, param in named_params:
            self.slots.append(ParamSlot(name, param, offset))
            offset += param.numel()
        self.num_eligible = offset
        self.k = k
        device = named_params[0][1].device
        values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device), requires_grad=trainable)
        self.fishdip_values = nn.ParameterDict({adapter_name: values})
        self.register_buffer("mask", torch.zeros(offset, dtype=torch.bool, device=device), persistent=False)
        self._written_version: Optional[int] = self.values._version
        self.optimizers = []  # weak references to the optimizers that stepped `values`
        self.grad_writes = 0  # backward contributions to `values.grad` so far

    @property
    def values(self) -> nn.Parameter:
        return self.fishdip_values[self._active_adapter]

    # -- gradients and write-back -------------------------------------------------------------
    def accumulate_grad(self, slot: ParamSlot, grad_weight: torch.Tensor) -> None:
        if slot.index.numel() == 0:
            return
        self.grad_writes += 1
        picked = grad_weight.reshape(-1).index_select(0, slot.index.to(grad_weight.device))
        if self.values.grad is None:
            self.values.grad = torch.zeros_like(self.values)
        self.values.grad[slot.value_range()] += picked.to(self.values.dtype).to(self.values.device)

    @torch.no_grad()
    def write_back(self, force: bool = False) -> None:
        """Copy `values` into the weights if they changed since the last write."""
        if not force and self.values._version == self._written_version:
            return
        for slot in self.slots:
            if slot.index.numel():
                slot.follow_device()
                update = self.values[slot.value_range()].to(slot.param.device, slot.param.dtype)
                slot.flat.index_copy_(0, slot.index, update)
        self._written_version = self.values._version

    def follow_devices(self) -> None:
        for slot in self.slots:
            slot.follow_device()

    @torch.no_grad()
    def restore(self, index, touched, base, weights, values: torch.Tensor) -> None:
        """Put back a saved selection: per slot the trainable positions `index`, the positions ever
        trainable `touched` with their `base` and current `weights` values; and `values`. Entries
        touched now but not in the saved state get their base values back. No check is made."""
        offset = 0
        for slot, positions, ever, ever_base, current in zip(self.slots, index, touched, base, weights):
            slot.follow_device()
            device, dtype = slot.param.device, slot.param.dtype
            slot.flat.index_copy_(0, slot.touched, slot.base)
            slot.touched, slot.base = ever.to(device), ever_base.to(device, dtype)
            slot.flat.index_copy_(0, slot.touched, current.to(device, dtype))
            slot.index, slot.value_offset = positions.to(device), offset
            offset += positions.numel()
        self.values.copy_(values.to(self.values.device, self.values.dtype))
        self.values.grad = None
        self._written_version = self.values._version
        self.mask.zero_()
        self.mask[self.flat_selection().to(self.mask.device)] = True

    # -- mask refresh ---------------------------------------------------------------------------
    def flat_selection(self) -> torch.Tensor:
        """Current trainable positions in the flat mask, sorted (K,), on the CPU."""
        parts = [slot.index.cpu() + slot.flat_offset for slot in self.slots]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    @torch.no_grad()
    def set_selection(self, per_tensor: list[torch.Tensor]) -> bool:
        """Make `per_tensor[i]` (sorted positions in slot i, K in all) the trainable entries.

        Entries that stay keep their value, gradient and optimizer state; new entries start from the
        weight's value with zero gradient and state; entries that leave keep what they learned.
        Returns True if the selection changed.
        """
        if sum(t.numel() for t in per_tensor) != self.k:
            raise RuntimeError(f"a selection must hold exactly K={self.k} entries.")
        self.write_back()
        old_flat = self.flat_selection()
        had_mask = bool(self.mask.any())
        values = torch.empty_like(self.values)
        offset = 0
        for slot, positions in zip(self.slots, per_tensor):
            slot.follow_device()
            positions = positions.to(slot.param.device)
            slot.record_base(positions)
            slot.index, slot.value_offset = positions, offset
            values[offset : offset + positions.numel()] = slot.flat[positions].to(values.device, values.dtype)
            offset += positions.numel()
        new_flat = self.flat_selection()
        if had_mask:
            source, stays = self._positions_in(old_flat, new_flat)
            values[stays.to(values.device)] = self._remap(self.values, source, stays)[stays.to(values.device)]
            self._remap_gradient_and_optimizer_state(source, stays)
        else:
            self.values.grad = None if self.values.grad is None else torch.zeros_like(self.values)
        self.values.copy_(values)
        self._written_version = self.values._version  # the weights already hold these values
        self.mask.zero_()
        self.mask[new_flat.to(self.mask.device)] = True
        return not had_mask or not torch.equal(old_flat, new_flat)

    @staticmethod
    def _positions_in(old_flat: torch.Tensor, new_flat: torch.Tensor):
        source = torch.searchsorted(old_flat, new_flat).clamp(max=old_flat.numel() - 1)
        stays = old_flat[source] == new_flat
        return source.to(torch.int64), stays

    def _remap(self, tensor: torch.Tensor, source: torch.Tensor, stays: torch.Tensor) -> torch.Tensor:
        source, stays = source.to(tensor.device), stays.to(tensor.device)
        remapped = torch.zeros_like(tensor)
        remapped[stays] = tensor[source[stays]]
        return remapped

    def _remap_gradient_and_optimizer_state(self, source: torch.Tensor, stays: torch.Tensor) -> None:
        if self.values.grad is not None:
            self.values.grad = self._remap(self.values.grad, source, stays)
        for ref in self.optimizers:
            optimizer = ref()
            if optimizer is None or not getattr(optimizer, "fishdip_state_is_per_entry", True):
                continue
            state = optimizer.state.get(self.values, {})
            for key, tensor in state.items():
                if isinstance(tensor, torch.Tensor) and tensor.shape == self.values.shape:
                    state[key] = self._remap(tensor, source, stays)

    # -- base values ----------------------------------------------------------------------------
    @torch.no_grad()
    def swap_base(self, stash: Optional[list[torch.Tensor]]) -> Optional[list[torch.Tensor]]:
        """With `stash=None`, put the base values back into the weights and return the trained ones;
        given that stash, put the trained values back."""
        self.write_back()
        if stash is None:
            trained = []
            for slot in self.slots:
                slot.follow_device()
                trained.append(slot.flat[slot.touched].clone())
                slot.flat.index_copy_(0, slot.touched, slot.base)
            return trained
        for slot, values in zip(self.slots, stash):
            slot.flat.index_copy_(0, slot.touched, values)
        return None

"""One FISH-DIP adapter's sparse state: which weight entries it trains, their values, its deltas.

The optimizer sees only `values` (K float32 entries, the same tensor across mask refreshes), so its
state is O(K) and nothing it does (momentum, weight decay) can reach a frozen entry. The model's weights
stay ordinary frozen tensors. While the adapter is *in the weights* (the active, enabled adapter) they
hold its trained values: gradients reach `values` through the taps (`hooks.py`), and `write_back` copies
`values` into the weights after each optimizer step. Per weight tensor the adapter also remembers every
position it ever trained (`touched`) with the base value there, so it can take itself out of the weights
(`remove_from_weights`, which keeps the trained values aside) and put itself back, bit for bit.

Nothing here is O(|θ|): the boolean `mask` over all eligible entries is built on demand.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn


def positions_in(sorted_positions: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, its index in `sorted_positions` (clamped) and whether it is there."""
    if sorted_positions.numel() == 0:
        return torch.zeros_like(queries), torch.zeros_like(queries, dtype=torch.bool)
    found = torch.searchsorted(sorted_positions, queries).clamp(max=sorted_positions.numel() - 1)
    return found, sorted_positions[found] == queries


def position_dtype(numel: int) -> torch.dtype:
    """The dtype that stores positions in a tensor of `numel` entries: int32 unless it cannot."""
    return torch.int32 if numel < 2**31 else torch.int64


class Slot:
    """One eligible weight tensor and one adapter's share of it.

    `index` (sorted positions within the tensor that are trainable) and `touched` (sorted positions ever
    trained or loaded) read as int64 tensors and are stored as int32 where the tensor allows; `base`
    holds the base values at `touched` in the weight dtype, `stash` the trained values there while the
    adapter is out of the weights.
    """

    def __init__(self, name: str, param: nn.Parameter, flat_offset: int):
        if not param.is_contiguous():
            raise ValueError(f"FISH-DIP needs contiguous weights; '{name}' is not (call .contiguous() first).")
        self.name, self.param, self.flat_offset = name, param, flat_offset  # offset: first entry in the flat mask
        self._dtype = position_dtype(param.numel())
        self.value_offset = 0  # where the tensor's trainable entries start in `values`
        self.index = self.touched = torch.empty(0, dtype=torch.int64, device=param.device)
        self.base = torch.empty(0, dtype=param.dtype, device=param.device)
        self.stash: Optional[torch.Tensor] = None

    @property
    def index(self) -> torch.Tensor:
        return self._index.long()

    @index.setter
    def index(self, positions: torch.Tensor) -> None:
        self._index = positions.to(self._dtype)

    @property
    def touched(self) -> torch.Tensor:
        return self._touched.long()

    @touched.setter
    def touched(self, positions: torch.Tensor) -> None:
        self._touched = positions.to(self._dtype)

    @property
    def num_selected(self) -> int:
        return self._index.numel()

    @property
    def num_touched(self) -> int:
        return self._touched.numel()

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def flat(self) -> torch.Tensor:
        return self.param.data.view(-1)

    def value_range(self) -> slice:
        return slice(self.value_offset, self.value_offset + self.num_selected)

    def follow_device(self) -> None:
        """Move the position tensors to the weight's device and dtype (after `model.to(...)`)."""
        device, dtype = self.param.device, self.param.dtype
        if self._index.device != device:
            self._index, self._touched = self._index.to(device), self._touched.to(device)
        if self.base.device != device or self.base.dtype != dtype:
            self.base = self.base.to(device, dtype)
        if self.stash is not None and (self.stash.device != device or self.stash.dtype != dtype):
            self.stash = self.stash.to(device, dtype)

    def record_base(self, positions: torch.Tensor) -> None:
        """Remember the base values of `positions` that were never touched before (the weights must hold
        the base values there, i.e. this adapter is in the weights or no adapter is)."""
        if positions.numel() == 0:
            return
        _, known = positions_in(self.touched, positions)
        new = positions[~known]
        if new.numel() == 0:
            return
        touched = torch.cat([self.touched, new])
        base = torch.cat([self.base, self.flat[new]])
        order = torch.argsort(touched)
        self.touched, self.base = touched[order], base[order]

    def base_values_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The base values at `positions`, whatever the weights hold now."""
        values = self.flat[positions].clone()
        found, hit = positions_in(self.touched, positions)
        values[hit] = self.base[found[hit]]
        return values


class SparseAdapter:
    """The trainable `values` (K,) of one adapter and, per eligible weight, its `Slot`."""

    def __init__(self, name: str, named_params: list[tuple[str, nn.Parameter]], k: int, values: nn.Parameter):
        self.name = name
        self.slots: list[Slot] = []
        offset = 0
        for param_name, param in named_params:
            self.slots.append(Slot(param_name, param, offset))
            offset += param.numel()
        self.num_eligible = offset
        self.k = k
        self.values = values
        self.in_weights = True  # whether the weights hold this adapter's trained values
        self._written_version: Optional[int] = values._version
        self.optimizers: list = []  # weak references to the optimizers that hold `values`
        self.grad_writes = 0  # backward contributions to `values.grad` so far
        self._slot_of = {id(slot.param): slot for slot in self.slots}

    def slot_for(self, param: torch.Tensor) -> Optional[Slot]:
        return self._slot_of.get(id(param))

    @property
    def has_selection(self) -> bool:
        return any(slot.num_selected for slot in self.slots)

    @property
    def mask(self) -> torch.Tensor:
        """Flat boolean mask over all eligible entries (built on demand: O(|θ|) while it lives)."""
        mask = torch.zeros(self.num_eligible, dtype=torch.bool)
        mask[self.flat_selection()] = True
        return mask

    def flat_selection(self) -> torch.Tensor:
        """Current trainable positions in the flat mask, sorted (K,), on the CPU."""
        parts = [slot.index.cpu() + slot.flat_offset for slot in self.slots]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def register_optimizer(self, optimizer) -> None:
        if not any(ref() is optimizer for ref in self.optimizers):
            self.optimizers.append(weakref.ref(optimizer))

    def holds_values(self, optimizer) -> bool:
        return any(p is self.values for group in optimizer.param_groups for p in group["params"])

    # -- gradients and write-back -------------------------------------------------------------
    def accumulate(self, slot: Slot, selected_grad: torch.Tensor) -> None:
        """Add the gradient of `slot`'s trainable entries (in `slot.index` order) to `values.grad`."""
        if selected_grad.numel() == 0:
            return
        self.grad_writes += 1
        if self.values.grad is None:
            self.values.grad = torch.zeros_like(self.values)
        self.values.grad[slot.value_range()] += selected_grad.to(self.values.device, self.values.dtype)

    @torch.no_grad()
    def write_back(self, force: bool = False) -> None:
        """Copy `values` into the weights if they changed since the last write (in the weights only)."""
        if not self.in_weights or (not force and self.values._version == self._written_version):
            return
        for slot in self.slots:
            if slot.num_selected:
                slot.follow_device()
                update = self.values[slot.value_range()].to(slot.param.device, slot.param.dtype)
                slot.flat.index_copy_(0, slot.index, update)
        self._written_version = self.values._version

    # -- in and out of the weights ----------------------------------------------------------------
    @torch.no_grad()
    def remove_from_weights(self) -> None:
        """Put the base values back at every touched position, keeping the trained ones aside."""
        if not self.in_weights:
            return
        self.write_back()
        for slot in self.slots:
            slot.follow_device()
            slot.stash = slot.flat[slot.touched].clone()
            slot.flat.index_copy_(0, slot.touched, slot.base)
        self.in_weights = False

    @torch.no_grad()
    def put_into_weights(self) -> None:
        """Write the trained values kept by `remove_from_weights` back into the weights."""
        if self.in_weights:
            return
        for slot in self.slots:
            slot.follow_device()
            if slot.stash is not None:
                slot.flat.index_copy_(0, slot.touched, slot.stash)
            slot.stash = None
        self.in_weights = True
        self._written_version = self.values._version

    @torch.no_grad()
    def add_delta_to_weights(self) -> None:
        """Add this adapter's deltas (trained − base, in float32) to whatever the weights hold; for several
        active adapters at once. The adapter must be out of the weights; `restore_base` undoes it exactly."""
        if self.in_weights:
            raise RuntimeError(f"adapter '{self.name}' is in the weights; remove_from_weights() first.")
        for slot in self.slots:
            slot.follow_device()
            if slot.stash is None or slot.num_touched == 0:
                continue
            delta = slot.stash.float() - slot.base.float()
            slot.flat.index_copy_(0, slot.touched, (slot.flat[slot.touched].float() + delta).to(slot.param.dtype))

    @torch.no_grad()
    def restore_base(self) -> None:
        """Write the base values back at every touched position (after `add_delta_to_weights`)."""
        for slot in self.slots:
            slot.follow_device()
            slot.flat.index_copy_(0, slot.touched, slot.base)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget everything: base values back in the weights, no selection, zero values."""
        for slot in self.slots:
            slot.follow_device()
            if self.in_weights:
                slot.flat.index_copy_(0, slot.touched, slot.base)
            empty = torch.empty(0, dtype=torch.int64, device=slot.param.device)
            slot.index, slot.touched, slot.value_offset, slot.stash = empty, empty.clone(), 0, None
            slot.base = torch.empty(0, dtype=slot.param.dtype, device=slot.param.device)
        self.values.zero_()
        self.values.grad = None
        self._written_version = self.values._version

    @torch.no_grad()
    def trained_values_at_touched(self, slot: Slot) -> torch.Tensor:
        """The adapter's trained values at `slot.touched` (float32, exact for the trainable entries)."""
        slot.follow_device()
        current = (slot.flat[slot.touched] if self.in_weights else slot.stash).float()
        if slot.num_selected:
            where = torch.searchsorted(slot.touched, slot.index)
            current[where] = self.values[slot.value_range()].detach().to(current.device)
        return current

    # -- mask refresh ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_selection(self, per_tensor: list[torch.Tensor]) -> bool:
        """Make `per_tensor[i]` (sorted positions in slot i, K in all) the trainable entries.

        Entries that stay keep their value, gradient and optimizer state; new entries start from the
        weight's value with zero gradient and state; entries that leave keep what they learned.
        The adapter must be in the weights. Returns True if the selection changed.
        """
        if sum(t.numel() for t in per_tensor) != self.k:
            raise RuntimeError(f"a selection must hold exactly K={self.k} entries.")
        if not self.in_weights:
            raise RuntimeError(f"adapter '{self.name}' is not in the weights; activate and enable it first.")
        self.write_back()
        old_flat = self.flat_selection()
        had_selection = self.has_selection
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
        if had_selection:
            source, stays = positions_in(old_flat, new_flat)
            stays_here = stays.to(values.device)
            values[stays_here] = self._remap(self.values, source, stays)[stays_here]
            self._remap_gradient_and_optimizer_state(source, stays)
        elif self.values.grad is not None:
            self.values.grad = torch.zeros_like(self.values)
        self.values.copy_(values)
        self._written_version = self.values._version  # the weights already hold these values
        return not had_selection or not torch.equal(old_flat, new_flat)

    @staticmethod
    def _remap(tensor: torch.Tensor, source: torch.Tensor, stays: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def restore(self, index, touched, base, trained, values: torch.Tensor) -> None:
        """Put back a saved state: per slot the trainable positions `index`, the positions ever touched
        `touched` with their `base` and `trained` values; and `values`. Positions touched now but not in
        the saved state get their base values back. The adapter must be in the weights. No check is made."""
        offset = 0
        for slot, positions, ever, ever_base, current in zip(self.slots, index, touched, base, trained):
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

"""FISH-DIP's own state between steps is O(K): 24 bytes per trainable entry until the mask moves.

Every tensor reachable from the tuner's own attributes (not from the model's modules, whose weights
are the base model's) is summed, with the optimizer's state for the values. Per trainable entry:
values 4 B, AdamW moments 8 B, position 4 B (int32); per entry ever trained: position 4 B and base
value 4 B (what taking the adapter out of the weights and saving its deltas need). The pool's samples
are counted apart: they are n training samples, not per-entry state.
"""

import dataclasses

import torch
from peft import get_peft_model
from torch import nn

from fishdip_peft import FishDipConfig, forward_with_per_sample_losses
from fishdip_peft.pool import RegressingPool

from .models import causal_batch, tiny_llama


def reachable_tensors(obj, seen_objects=None, found=None, skip=()):
    """Tensors reachable from `obj` through containers, dataclasses and plain objects (not nn.Modules)."""
    seen_objects = set() if seen_objects is None else seen_objects
    found = {} if found is None else found
    if id(obj) in seen_objects or isinstance(obj, skip):
        return found
    seen_objects.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found[obj.untyped_storage().data_ptr() if obj.numel() else id(obj)] = obj.untyped_storage().nbytes()
        return found
    if isinstance(obj, nn.Module) or callable(obj) and not hasattr(obj, "__dict__"):
        return found
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        items = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    else:
        return found
    for item in items:
        reachable_tensors(item, seen_objects, found, skip)
    return found


def state_tensors(model, optimizer) -> tuple[dict, int]:
    tuner = model.base_model
    own = {k: v for k, v in vars(tuner).items() if k not in ("model", "_modules", "_parameters", "_buffers")}
    tensors = reachable_tensors(own, skip=(RegressingPool, nn.Parameter))  # weights: the base model's
    values = tuner.sparse_adapters["default"].values
    tensors[values.untyped_storage().data_ptr()] = values.untyped_storage().nbytes()
    for state in optimizer.state.values():
        reachable_tensors(state, found=tensors)
    pool_bytes = sum(sum(reachable_tensors(p.pool).values()) for p in tuner.progress.values())
    return tensors, pool_bytes


def train(model, optimizer, steps: int) -> None:
    for step in range(steps):
        batch = causal_batch(step)
        outputs, losses = forward_with_per_sample_losses(model, batch)
        model.step(losses, batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_persistent_state_is_24_bytes_per_trainable_entry_until_the_mask_moves():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=3, num_regressing=4))
    adapter = model.base_model.sparse_adapters["default"]
    optimizer = torch.optim.AdamW([adapter.values], lr=1e-2)
    slots = len(adapter.slots)
    fixed = 16 * slots + 64  # per tensor: empty position / base tensors; the optimizer's step counter

    train(model, optimizer, steps=2)  # the first mask only
    total = sum(state_tensors(model, optimizer)[0].values())
    assert sum(s.num_touched for s in adapter.slots) == adapter.k
    assert total <= 24 * adapter.k + fixed, (total / adapter.k)

    train(model, optimizer, steps=6)  # two refreshes: entries that leave the mask keep what they learned
    tensors, pool = state_tensors(model, optimizer)
    total = sum(tensors.values())
    touched = sum(s.num_touched for s in adapter.slots)
    assert touched > adapter.k
    assert total <= 16 * adapter.k + 8 * touched + fixed
    eligible = sum(s.numel for s in adapter.slots)
    assert max(tensors.values()) < eligible  # no tensor over the eligible entries (not even a 1-byte mask)
    assert pool > 0  # the pooled samples were counted apart


def test_positions_are_stored_as_int32_and_read_as_int64():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05))
    train(model, torch.optim.SGD([model.base_model.sparse_adapters["default"].values], lr=0.1), steps=1)
    slot = next(s for s in model.base_model.sparse_adapters["default"].slots if s.num_selected)
    assert slot._index.dtype == torch.int32 and slot._touched.dtype == torch.int32
    assert slot.index.dtype == torch.int64 and torch.equal(slot.index, slot._index.long())

"""Sparse-delta checkpoints: per weight tensor, the entries that changed and by how much.

For each weight with changed entries the adapter file holds, under `base_model.model.<weight name>.`:
- `fishdip_indices`: sorted flat positions (int32, or int64 for tensors of 2**31 entries or more);
- `fishdip_deltas`: trained value minus base value at those positions (`delta_dtype`);
- `fishdip_shape`: the weight's shape (int64);
- `fishdip_fingerprint`: SHA-256 of the base values at those positions (rounded to bfloat16, so an
  adapter trained on a float32 base also loads onto the same base in bfloat16).
Loading checks every tensor's shape and fingerprint before it changes any weight.
"""

from __future__ import annotations

import hashlib

import torch

KEY_PREFIX = "base_model.model."
FIELDS = ("fishdip_indices", "fishdip_deltas", "fishdip_shape", "fishdip_fingerprint")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def fingerprint(base_values: torch.Tensor) -> torch.Tensor:
    data = base_values.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
    return torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def sparse_delta_state_dict(state, delta_dtype: str) -> dict[str, torch.Tensor]:
    """The adapter file's tensors for a `SparseTrainingState` (only entries whose value changed)."""
    state.write_back()
    tensors = {}
    for slot in state.slots:
        if slot.touched.numel() == 0:
            continue
        slot.follow_device()
        current = slot.flat[slot.touched].float()
        if slot.index.numel():  # float32 trained values are more precise than a low-precision weight
            where = torch.searchsorted(slot.touched, slot.index)
            current[where] = state.values[slot.value_range()].to(current.device)
        delta = current - slot.base.float()
        changed = delta != 0
        if not bool(changed.any()):
            continue
        positions = slot.touched[changed]
        key = KEY_PREFIX + slot.name
        tensors[f"{key}.fishdip_indices"] = positions.to("cpu", _index_dtype(slot.numel))
        tensors[f"{key}.fishdip_deltas"] = delta[changed].to("cpu", _DTYPES[delta_dtype])
        tensors[f"{key}.fishdip_shape"] = torch.tensor(list(slot.param.shape), dtype=torch.int64)
        tensors[f"{key}.fishdip_fingerprint"] = fingerprint(slot.base[changed])
    return tensors


def _group_by_weight(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition(".")
        if field not in FIELDS or not name.startswith(KEY_PREFIX):
            raise ValueError(f"'{key}' is not a FISH-DIP sparse-delta entry; is this a FISH-DIP adapter file?")
        groups.setdefault(name[len(KEY_PREFIX) :], {})[field] = tensor
    return groups


def validate_and_apply(state, tensors: dict[str, torch.Tensor]) -> None:
    """Add the file's deltas to the weights. Every check runs before the first weight changes."""
    entries = [_checked_entry(state, name, group) for name, group in _group_by_weight(tensors).items()]
    plan = []
    for slot, positions, deltas, saved_fingerprint in entries:
        base = slot.flat[positions]
        if not torch.equal(fingerprint(base), saved_fingerprint.to(torch.uint8)):
            raise ValueError(
                f"the base values of '{slot.name}' differ from those the adapter was trained on: this is not the "
                "adapter's base model (or the model was already modified). Nothing was changed."
            )
        plan.append((slot, positions, base, deltas))
    with torch.no_grad():
        for slot, positions, base, deltas in plan:
            slot.record_base(positions)
            updated = base.float() + deltas.to(slot.param.device, torch.float32)
            slot.flat.index_copy_(0, positions, updated.to(slot.param.dtype))


def _checked_entry(state, name: str, group: dict[str, torch.Tensor]):
    """The slot, positions and deltas of one weight's entry, after checking shape and indices."""
    missing = [f for f in FIELDS if f not in group]
    if missing:
        raise ValueError(f"the adapter entry for '{name}' lacks {missing}; the file is incomplete.")
    slot = next((s for s in state.slots if s.name == name), None)
    if slot is None:
        raise ValueError(
            f"the adapter changes '{name}', which is not an eligible weight of this model. Load it onto "
            "the base model it was trained from, with the same target_modules/exclude_modules."
        )
    shape = tuple(group["fishdip_shape"].tolist())
    if shape != tuple(slot.param.shape):
        raise ValueError(
            f"'{name}' has shape {tuple(slot.param.shape)} here but {shape} in the adapter: the adapter was "
            "trained on a different base model."
        )
    positions = group["fishdip_indices"].to(torch.int64)
    deltas = group["fishdip_deltas"]
    if positions.dim() != 1 or positions.shape != deltas.shape:
        raise ValueError(f"'{name}': indices and deltas must be 1-D of the same length.")
    if positions.numel() and (
        positions.min() < 0 or positions.max() >= slot.numel or bool((positions[1:] <= positions[:-1]).any())
    ):
        raise ValueError(f"'{name}': indices must be sorted, unique and inside the tensor.")
    slot.follow_device()
    return slot, positions.to(slot.param.device), deltas, group["fishdip_fingerprint"]

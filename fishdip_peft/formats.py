"""FISH-DIP's two file formats: the adapter file (sparse deltas) and the resumable training state.

**Adapter file** (`adapter_model.safetensors`, written by `PeftModel.save_pretrained`). For each weight
with changed or trainable entries, under `base_model.model.<weight name>.`:
- `fishdip_indices`: sorted flat positions (int32, or int64 for tensors of 2**31 entries or more);
- `fishdip_deltas`: trained value minus base value at those positions (`delta_dtype`);
- `fishdip_selected`: which of those positions are trainable now (bits, packed little-endian in uint8),
  so that `from_pretrained(..., is_trainable=True)` resumes with the same mask;
- `fishdip_shape`: the weight's shape (int64);
- `fishdip_fingerprint`: SHA-256 of the base values at those positions (rounded to bfloat16, so an
  adapter trained on a float32 base also loads onto the same base in bfloat16).
A `base_model.model.fishdip_manifest` (SHA-256 of every other tensor of the file) makes a file with a
tensor edited, removed or added refuse to load. Loading checks the manifest and every tensor's shape,
indices, deltas and fingerprint before it changes any weight. (Files written before the trainable flags
and the manifest existed load too, without a mask.)

**Training state** (`fishdip_state.pt`): per adapter the mask, the trained values, the base values it
replaced, the pool and the refresh schedule; `save_training_state` / `load_training_state` work with the
Trainer's checkpoints and in a custom loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping
from typing import Any

import peft.peft_model as peft_model
import torch
from safetensors import safe_open

from . import distributed
from .atomic import atomic_write, write_bytes
from .encoding import fingerprint, pack_bits, state_digest, unpack_bits
from .lookup import fishdip_tuner

KEY_PREFIX = "base_model.model."
FIELDS = ("fishdip_indices", "fishdip_deltas", "fishdip_selected", "fishdip_shape", "fishdip_fingerprint")
REQUIRED_FIELDS = ("fishdip_indices", "fishdip_deltas", "fishdip_shape", "fishdip_fingerprint")
MANIFEST_KEY = KEY_PREFIX + "fishdip_manifest"
CONFIG_KEY = KEY_PREFIX + "fishdip_config"  # the saving config as UTF-8 JSON bytes
SPECIAL_KEYS = (MANIFEST_KEY, CONFIG_KEY)
ADAPTER_FILE = "adapter_model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STATE_NAME = "fishdip_state.pt"
STATE_FORMAT = 2


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def write_next_adapter_file_atomically() -> None:
    """Make the next `safetensors` write of `PeftModel.save_pretrained` atomic, if it writes FISH-DIP tensors.

    peft writes `adapter_model.safetensors` in place, so an interrupted save would leave a truncated file.
    Called as peft collects a FISH-DIP adapter's tensors (just before it writes them), this swaps peft's
    writer for a one-shot one that restores it at once and writes to a temporary file renamed over the
    target. Any other write goes to peft's writer unchanged; nothing stays patched after the save
    (`FishDipConfig.save_pretrained`, which peft calls next, disarms it in any case).
    """
    original = peft_model.safe_save_file
    if getattr(original, "fishdip_one_shot", False):
        return

    def one_shot(tensors, filename, metadata=None):
        disarm_adapter_file_writer()
        if not any(key.rpartition(".")[2] in FIELDS for key in tensors):
            return original(tensors, filename, metadata=metadata)
        from safetensors import torch as safetensors_torch

        # serialised here (safetensors' own save_file renames a temporary file of its own)
        data = safetensors_torch.save(tensors, metadata=metadata)
        atomic_write(filename, lambda tmp: write_bytes(tmp, data))

    one_shot.fishdip_one_shot = True
    one_shot.original = original
    peft_model.safe_save_file = one_shot


def disarm_adapter_file_writer() -> None:
    writer = peft_model.safe_save_file
    if getattr(writer, "fishdip_one_shot", False):
        peft_model.safe_save_file = writer.original


def adapter_state_dict(adapter, delta_dtype: str, config_json: str = "") -> dict[str, torch.Tensor]:
    """The adapter file's tensors for a `SparseAdapter`: entries whose value changed, and trainable ones;
    with `config_json`, the saving config too, so the file describes itself whole."""
    adapter.write_back()
    tensors = {}
    for slot in adapter.slots:
        if slot.num_touched == 0:
            continue
        delta = adapter.trained_values_at_touched(slot) - slot.base.float()
        selected = torch.zeros(slot.touched.numel(), dtype=torch.bool, device=delta.device)
        if slot.num_selected:
            selected[torch.searchsorted(slot.touched, slot.index)] = True
        keep = (delta != 0) | selected
        if not bool(keep.any()):
            continue
        key = KEY_PREFIX + slot.name
        tensors[f"{key}.fishdip_indices"] = slot.touched[keep].to("cpu", _index_dtype(slot.numel))
        tensors[f"{key}.fishdip_deltas"] = delta[keep].to("cpu", DTYPES[delta_dtype])
        tensors[f"{key}.fishdip_selected"] = pack_bits(selected[keep].cpu())
        tensors[f"{key}.fishdip_shape"] = torch.tensor(list(slot.param.shape), dtype=torch.int64)
        tensors[f"{key}.fishdip_fingerprint"] = fingerprint(slot.base[keep])
    if config_json:
        tensors[CONFIG_KEY] = torch.frombuffer(bytearray(config_json.encode()), dtype=torch.uint8)
    if tensors:
        tensors[MANIFEST_KEY] = manifest(tensors)
    return tensors


def embedded_config(path: str, verify: bool = False) -> dict | None:
    """The config saved inside an adapter file (None without one; {} if damaged). Opening checks the file is
    readable; `verify` first checks every tensor against the manifest, as loading does, for when the
    embedded config is to be used. A clear error names the file otherwise."""
    try:
        with safe_open(path, "pt") as handle:
            keys = list(handle.keys())
            wanted = keys if verify else [CONFIG_KEY] if CONFIG_KEY in keys else []
            tensors = {key: handle.get_tensor(key) for key in wanted}
    except Exception as error:
        raise ValueError(f"{path} is not a readable adapter file ({type(error).__name__}: {error}); save the "
                         "adapter again or use an intact copy. Nothing was changed.") from error
    if verify:
        try:
            check_manifest(tensors)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    if CONFIG_KEY not in tensors:
        return None
    try:
        return json.loads(bytes(tensors[CONFIG_KEY].to(torch.uint8).tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # damaged: it matches no config, so the caller verifies the file, which refuses it


def is_fishdip_key(key: str) -> bool:
    """A key of FISH-DIP's own part of an adapter file (not, e.g., a modules_to_save copy peft adds)."""
    return key in SPECIAL_KEYS or key.rpartition(".")[2] in FIELDS


def manifest(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """SHA-256 over every FISH-DIP tensor's name, dtype, shape and bytes (the manifest itself excluded)."""
    digest = hashlib.sha256()
    for key in sorted(k for k in tensors if k != MANIFEST_KEY and is_fishdip_key(k)):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def check_manifest(tensors: dict[str, torch.Tensor]) -> None:
    if MANIFEST_KEY not in tensors:
        return
    if not torch.equal(manifest(tensors), tensors[MANIFEST_KEY].to(torch.uint8).cpu()):
        raise ValueError(
            "the adapter file does not match its manifest: a tensor was edited, removed or added after it was "
            "saved (or the file is from a partial copy). Save the adapter again or use an intact copy. Nothing "
            "was changed."
        )


def valid_positions(positions: torch.Tensor, numel: int) -> bool:
    """Whether 1-D `positions` are sorted, unique and inside a tensor of `numel` entries."""
    if positions.numel() == 0:
        return True
    return int(positions[0]) >= 0 and int(positions[-1]) < numel and not bool((positions[1:] <= positions[:-1]).any())


def _group_by_weight(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in SPECIAL_KEYS:
            continue
        name, _, field = key.rpartition(".")
        if field not in FIELDS or not name.startswith(KEY_PREFIX):
            raise ValueError(f"'{key}' is not a FISH-DIP sparse-delta entry; is this a FISH-DIP adapter file?")
        groups.setdefault(name[len(KEY_PREFIX) :], {})[field] = tensor
    return groups


def apply_adapter_state_dict(adapter, tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Add the file's deltas to the weights (the adapter must be in the weights, with nothing touched
    yet). Returns, per slot, the trainable positions the file records. Every check runs before the
    first weight changes."""
    check_manifest(tensors)
    entries = [_checked_entry(adapter, name, group) for name, group in _group_by_weight(tensors).items()]
    plan = []
    for slot, positions, deltas, selected, saved_fingerprint in entries:
        base = slot.flat[positions]
        if not torch.equal(fingerprint(base), saved_fingerprint.to(torch.uint8)):
            raise ValueError(
                f"the base values of '{slot.name}' differ from those the adapter was trained on: this is not the "
                "adapter's base model (or the model was already modified). Nothing was changed."
            )
        plan.append((slot, positions, base, deltas, selected))
    selection = {id(slot): torch.empty(0, dtype=torch.int64, device=slot.param.device) for slot in adapter.slots}
    with torch.no_grad():
        for slot, positions, base, deltas, selected in plan:
            slot.record_base(positions)
            updated = base.float() + deltas.to(slot.param.device, torch.float32)
            slot.flat.index_copy_(0, positions, updated.to(slot.param.dtype))
            selection[id(slot)] = positions[selected.to(positions.device)]
    return [selection[id(slot)] for slot in adapter.slots]


def _checked_entry(adapter, name: str, group: dict[str, torch.Tensor]):
    """The slot, positions, deltas and trainable flags of one weight's entry, after checking them."""
    missing = [f for f in REQUIRED_FIELDS if f not in group]
    if missing:
        raise ValueError(f"the adapter entry for '{name}' lacks {missing}; the file is incomplete.")
    slot = next((s for s in adapter.slots if s.name == name), None)
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
    if group["fishdip_indices"].dtype not in (torch.int32, torch.int64):
        raise ValueError(f"'{name}': fishdip_indices must be int32 or int64, got {group['fishdip_indices'].dtype}.")
    positions, deltas = group["fishdip_indices"].to(torch.int64), group["fishdip_deltas"]
    if positions.dim() != 1 or positions.shape != deltas.shape:
        raise ValueError(f"'{name}': indices and deltas must be 1-D of the same length.")
    if not deltas.is_floating_point():
        raise ValueError(f"'{name}': fishdip_deltas must be floating point, got {deltas.dtype}.")
    if not bool(torch.isfinite(deltas).all()):
        raise ValueError(f"'{name}': fishdip_deltas holds NaN or infinite values; the adapter is corrupt.")
    if not valid_positions(positions, slot.numel):
        raise ValueError(f"'{name}': indices must be sorted, unique and inside the tensor.")
    selected = torch.zeros(positions.numel(), dtype=torch.bool)
    if "fishdip_selected" in group:
        flags = group["fishdip_selected"]
        if flags.dtype != torch.uint8 or flags.dim() != 1 or flags.numel() != -(-positions.numel() // 8):
            raise ValueError(f"'{name}': fishdip_selected must hold one bit per index (uint8, packed).")
        selected = unpack_bits(flags, positions.numel())
    if group["fishdip_fingerprint"].numel() != 32:
        raise ValueError(f"'{name}': fishdip_fingerprint must be a SHA-256 digest (32 bytes).")
    slot.follow_device()
    return slot, positions.to(slot.param.device), deltas, selected, group["fishdip_fingerprint"]


# -- training state ---------------------------------------------------------------------------------------
def adapter_training_state(tuner, name: str) -> dict[str, Any]:
    """What one adapter needs to resume exactly: the mask, values, touched entries, pool, schedule."""
    adapter, progress = tuner.sparse_adapters[name], tuner.progress[name]
    adapter.write_back()
    for slot in adapter.slots:
        slot.follow_device()
    return {
        "progress": progress.state_dict(),
        "num_regressing": progress.pool.capacity,
        "pools": distributed.gather_pool_states(progress.pool),
        "index": [slot.index.cpu() for slot in adapter.slots],
        "touched": [slot.touched.cpu() for slot in adapter.slots],
        "base": [slot.base.cpu() for slot in adapter.slots],
        "trained": [adapter.trained_values_at_touched(slot).to(slot.param.dtype).cpu() for slot in adapter.slots],
        "values": adapter.values.detach().cpu().clone(),
        "names": [slot.name for slot in adapter.slots],
        "shapes": [tuple(slot.param.shape) for slot in adapter.slots],
    }


def restore_training_state(tuner, state: Mapping[str, Any]) -> None:
    """Restore what `formats.save_training_state` wrote: for every adapter, the weights at every entry
    it ever trained, its values, mask, pool and schedule. Every check runs before anything changes."""
    if tuner._disabled:
        raise RuntimeError("enable the adapter (leave disable_adapter()) before loading a training state.")
    saved = state["adapters"]
    if set(saved) != set(tuner.sparse_adapters):
        raise ValueError(f"the training state holds adapters {sorted(saved)}; this model has "
                         f"{sorted(tuner.sparse_adapters)}.")
    for name, entry in saved.items():
        _check_training_state(tuner.sparse_adapters[name], entry)
        capacity = tuner.progress[name].pool.capacity
        if entry.get("num_regressing", capacity) != capacity:
            raise ValueError(
                f"the training state of adapter '{name}' was saved with num_regressing={entry['num_regressing']}; "
                f"this model has num_regressing={capacity}. Resume with the saved value, or start the run over. "
                "Nothing was changed."
            )
    for name, entry in saved.items():
        adapter, progress = tuner.sparse_adapters[name], tuner.progress[name]
        with tuner._weights_of(name):
            adapter.restore(entry["index"], entry["touched"], entry["base"], entry["trained"], entry["values"])
        progress.load_state_dict(entry["progress"])
        pool_state = distributed.pool_state_for_this_process(entry["pools"], progress.pool.capacity)
        progress.pool.load_state_dict(distributed.to_device(pool_state, adapter.values.device))


ENTRY_KEYS = ("progress", "num_regressing", "pools", "index", "touched", "base", "trained", "values", "names",
              "shapes")
PROGRESS_KEYS = ("optimizer_steps", "refreshes", "attempts", "last_refresh_step", "manual")


def _bad(field: str, problem: str) -> ValueError:
    return ValueError(f"the training state's {field} {problem}; it is corrupt or from another run. Resume from "
                      "another checkpoint. Nothing was changed.")


def _check_training_state(adapter, entry: Mapping[str, Any]) -> None:
    """Every check of one adapter's saved state, before anything changes."""
    if not isinstance(entry, Mapping):
        raise _bad(f"entry of adapter '{adapter.name}'", "is not a mapping")
    missing = [key for key in ENTRY_KEYS if key not in entry]
    if missing:
        raise _bad(f"entry of adapter '{adapter.name}'", f"lacks {missing}")
    progress = entry["progress"]
    if not isinstance(progress, Mapping) or any(key not in progress for key in PROGRESS_KEYS):
        raise _bad("progress", f"must hold {list(PROGRESS_KEYS)}")
    counters = [progress[k] for k in ("optimizer_steps", "refreshes", "attempts")]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counters) or not isinstance(
            progress["manual"], bool) or not (progress["last_refresh_step"] is None or isinstance(
            progress["last_refresh_step"], int)):
        raise _bad("progress", "holds counters of the wrong type or sign")
    names, shapes = [s.name for s in adapter.slots], [tuple(s.param.shape) for s in adapter.slots]
    if list(entry["names"]) != names or [tuple(s) for s in entry["shapes"]] != shapes:
        raise ValueError("the training state is for other eligible weights (another model or target_modules).")
    for field in ("index", "touched", "base", "trained"):
        if not isinstance(entry[field], (list, tuple)) or len(entry[field]) != len(adapter.slots):
            raise _bad(field, f"must hold one tensor per eligible weight ({len(adapter.slots)})")
    values = entry["values"]
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != adapter.k:
        raise ValueError(f"the training state has {getattr(values, 'shape', values)} trainable values; this model "
                         f"has K={adapter.k}.")
    if not values.is_floating_point() or not bool(torch.isfinite(values).all()):
        raise _bad("values", "are not finite floating-point numbers")
    selected = 0
    for slot, index, touched, base, trained in zip(adapter.slots, entry["index"], entry["touched"], entry["base"],
                                                  entry["trained"]):
        for field, positions in (("index", index), ("touched", touched)):
            if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64 or positions.dim() != 1:
                raise _bad(f"{field} of '{slot.name}'", "must be a 1-D int64 tensor")
            if not valid_positions(positions, slot.numel):
                raise _bad(f"{field} of '{slot.name}'", "must be sorted, unique positions inside the weight")
        if index.numel() and not bool(torch.isin(index, touched).all()):
            raise _bad(f"index of '{slot.name}'", "holds positions that were never touched")
        for field, tensor in (("base", base), ("trained", trained)):
            if not isinstance(tensor, torch.Tensor) or tensor.shape != touched.shape:
                raise _bad(f"{field} of '{slot.name}'", "must hold one value per touched position")
            if tensor.dtype != slot.param.dtype:
                raise ValueError(f"'{slot.name}' is {slot.param.dtype} here but was {tensor.dtype} in training; "
                                 "load the same dtype.")
            if not bool(torch.isfinite(tensor).all()):
                raise _bad(f"{field} of '{slot.name}'", "holds values that are not finite")
        if not torch.equal(slot.base_values_at(touched.to(slot.param.device)).cpu(), base):
            raise ValueError(f"the base values of '{slot.name}' differ from those the training state was made "
                             "from: this is not the same base model. Nothing was changed.")
        selected += index.numel()
    if selected != adapter.k:
        raise _bad("index", f"selects {selected} entries; this model trains K={adapter.k}")
    pools = entry["pools"]
    if not isinstance(pools, (list, tuple)) or not pools:
        raise _bad("pools", "must hold one pool per process")
    for pool in pools:
        if not isinstance(pool, Mapping) or any(key not in pool for key in ("entries", "seen", "rng")):
            raise _bad("pools", "must hold entries, seen and rng")
        if len(pool["entries"]) > entry["num_regressing"]:
            raise _bad("pools", f"hold more samples than num_regressing={entry['num_regressing']}")
        for item in pool["entries"]:
            if not (isinstance(item, (list, tuple)) and len(item) == 3 and isinstance(item[2], Mapping)):
                raise _bad("pools", "hold malformed entries")
        try:
            random.Random().setstate(pool["rng"])
        except (TypeError, ValueError) as error:
            raise _bad("pools' rng", f"is not a random generator state ({error})") from None


def save_training_state(model, directory: str, write: bool = True) -> None:
    """Write `directory/fishdip_state.pt` for every adapter of `model`. Every process must call it (the
    pools are gathered); only those with `write=True` write. The file appears whole or not at all."""
    tuner = fishdip_tuner(model)
    state = {"format": STATE_FORMAT, "active_adapter": tuner.active_adapter,
             "adapters": {name: adapter_training_state(tuner, name) for name in tuner.sparse_adapters}}
    state["manifest"] = torch.frombuffer(bytearray(state_digest(state)), dtype=torch.uint8)
    if write:
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, STATE_NAME), lambda tmp_path: torch.save(state, tmp_path))


def read_training_state(path: str) -> dict[str, Any]:
    """The content of a training-state file, or a clear error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: this checkpoint holds no FISH-DIP training state.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable FISH-DIP training state ({type(error).__name__}: {error}); "
                         "resume from another checkpoint.") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} has format {found!r}; this version reads format {STATE_FORMAT}.")
    if not isinstance(state.get("adapters"), Mapping):
        raise ValueError(f"{path} holds no 'adapters' mapping; it is not a whole FISH-DIP training state.")
    saved = state.pop("manifest", None)
    if saved is not None and (not isinstance(saved, torch.Tensor)
                              or bytes(saved.to(torch.uint8).tolist()) != state_digest(state)):
        raise ValueError(f"{path} does not match its manifest: it was modified or damaged after it was written. "
                         "Resume from another checkpoint. Nothing was changed.")
    return state


def load_training_state(model, directory: str) -> None:
    """Restore what `save_training_state` wrote into `directory` (see `FishDipModel.load_training_state`)."""
    restore_training_state(fishdip_tuner(model), read_training_state(os.path.join(directory, STATE_NAME)))


def has_training_state(directory) -> bool:
    return directory is not None and os.path.isfile(os.path.join(directory, STATE_NAME))

"""Finding the FISH-DIP tuner inside whatever wraps it."""

from __future__ import annotations

from torch import nn


def fishdip_tuner(model: nn.Module):
    """The `FishDipModel` inside `model` (a PeftModel, possibly wrapped by DDP or torch.compile)."""
    seen = model
    for _ in range(6):
        if getattr(type(seen), "is_fishdip_tuner", False):
            return seen
        if isinstance(seen, nn.parallel.DistributedDataParallel):
            seen = seen.module
        elif hasattr(seen, "_orig_mod"):
            seen = seen._orig_mod
        else:
            seen = getattr(seen, "base_model", None)
    raise TypeError(
        f"expected a model built by get_peft_model(model, FishDipConfig(...)), got {type(model).__name__}."
    )


def is_fishdip_model(model: nn.Module) -> bool:
    try:
        fishdip_tuner(model)
    except TypeError:
        return False
    return True

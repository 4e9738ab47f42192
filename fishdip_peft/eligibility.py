"""Which parameters of a model an adapter may train (`target_modules`, `exclude_modules`)."""

from __future__ import annotations

import re

from torch import nn

from .config import FishDipConfig


def _matches(module_name: str, patterns) -> bool:
    """A regex matches the full module name; a list item matches a module whose dotted name contains it as
    whole components (`q_proj`, `self_attn`, `layers.0`), and so every module below it."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(f".{p}." in f".{module_name}." for p in patterns)


def eligible_parameters(model: nn.Module, config: FishDipConfig) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the targeted modules, in `named_parameters` order, tied weights once."""
    owner_of = {}
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            owner_of.setdefault(id(param), module_name)
    targeted, named = set(), []
    for name, param in model.named_parameters():
        owner = owner_of[id(param)]
        if config.target_modules is not None and not _matches(owner, config.target_modules):
            continue
        targeted.add(owner)
        if config.exclude_modules is not None and _matches(owner, config.exclude_modules):
            continue
        if config.modules_to_save and _matches(owner, list(config.modules_to_save)):
            continue  # trained in full by peft's modules_to_save copy
        if _matches(owner, ["modules_to_save"]):
            continue  # another adapter's modules_to_save copy
        named.append((name, param))
    if config.target_modules is not None and not targeted:
        available = sorted({n for n, m in model.named_modules() if n and any(True for _ in m.parameters(False))})
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no module with parameters. "
            f"Modules with parameters include: {available[:12]}{' ...' if len(available) > 12 else ''}."
        )
    if not named:
        raise ValueError("no parameter is eligible for FISH-DIP: check target_modules and exclude_modules.")
    return named

"""Composing FISH-DIP adapters: a weighted sum of sparse deltas (Ansell et al. 2022)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .pool import RegressingPool
from .progress import AdapterProgress
from .sparse import SparseAdapter


@torch.no_grad()
def add_weighted_adapter(tuner, adapters: list[str], weights: list[float], adapter_name: str) -> None:
    """Add `adapter_name` to `tuner` with deltas Σ weights[i] · delta(adapters[i]), held out of the weights."""
    if adapter_name in tuner.sparse_adapters:
        raise ValueError(f"an adapter named '{adapter_name}' exists already; pick another adapter_name.")
    if not adapters or len(adapters) != len(weights):
        raise ValueError("pass one weight per adapter, e.g. add_weighted_adapter(['a', 'b'], [0.5, 0.5], 'ab').")
    missing = [name for name in adapters if name not in tuner.sparse_adapters]
    if missing:
        raise ValueError(f"unknown adapter(s) {missing}; this model has {list(tuner.sparse_adapters)}.")
    sources = [tuner.sparse_adapters[name] for name in adapters]
    layout = [slot.name for slot in sources[0].slots]
    if any([slot.name for slot in source.slots] != layout for source in sources[1:]):
        raise ValueError("the adapters train different weights (target_modules / exclude_modules); only adapters "
                         "over the same eligible weights can be combined.")
    config = copy.deepcopy(tuner.peft_config[adapters[0]])
    first = sources[0]
    values = nn.Parameter(torch.zeros(first.k, dtype=torch.float32, device=first.values.device), requires_grad=False)
    combined = SparseAdapter(adapter_name, [(s.name, s.param) for s in first.slots], first.k, values)
    for position, slot in enumerate(combined.slots):
        parts = [(source.slots[position], weight, source) for source, weight in zip(sources, weights)]
        touched = torch.unique(torch.cat([s.touched for s, _, _ in parts]))  # sorted
        base = slot.base_values_at(touched) if touched.numel() else slot.base
        for s, _, _ in parts:  # the sources know the base values of what they touched
            found = torch.searchsorted(touched, s.touched)
            base[found] = s.base.to(base.dtype)
        delta = torch.zeros(touched.numel(), dtype=torch.float32, device=slot.param.device)
        for s, weight, source in parts:
            if s.num_touched:
                delta[torch.searchsorted(touched, s.touched)] += weight * (
                    source.trained_values_at_touched(s) - s.base.float())
        slot.touched, slot.base = touched, base
        slot.stash = (base.float() + delta).to(slot.param.dtype)
    combined.in_weights = False
    tuner.peft_config[adapter_name] = config
    tuner.fishdip_values[adapter_name] = values
    tuner.sparse_adapters[adapter_name] = combined
    tuner.progress[adapter_name] = AdapterProgress(RegressingPool(config.num_regressing, config.sample_aware,
                                                                  config.seed))

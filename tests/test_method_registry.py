"""The method registry (`benchmarks.methods.METHODS`) is complete: every entry has every field, every
method name the benchmarks use is an entry, and every entry trains, saves and loads through its own hooks."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import pytest
import torch

from benchmarks.conll04 import authors, report, run
from benchmarks.efficiency import cli as efficiency_cli
from benchmarks.efficiency import report as efficiency_report
from benchmarks.efficiency.measure import safetensors_entries
from benchmarks.methods import (
    CHECKPOINT_KINDS,
    CONLL04_METHODS,
    EFFICIENCY_METHODS,
    FIXED_MASK,
    METHODS,
    REFERENCE,
    Method,
    PreparedMethod,
)
from fishdip_peft import forward_with_per_sample_losses
from tests.models import causal_batch, tiny_llama

FIELD_TYPES = {"name": str, "label": str, "lr_grid": tuple, "efficiency": bool, "checkpoint": str,
               "fishdip_adapter": bool, "calls_step": bool, "mask_settings": bool}
NEEDS_ADAPTERS = pytest.mark.skipif(importlib.util.find_spec("adapters") is None,
                                    reason="AdapterHub `adapters` is not installed")
SMALL = {"compacter": {"reduction_factor": 4}}  # hidden 16 / 4 = 4, divisible by phm_dim 4


def overridden(entry: Method, hook: str) -> bool:
    return getattr(type(entry), hook) is not getattr(Method, hook)


def test_every_field_is_declared_and_checked() -> None:
    assert {f.name for f in dataclasses.fields(Method)} == set(FIELD_TYPES) | {"builder", "adamw_weight_decay"}


@pytest.mark.parametrize("name", METHODS)
def test_every_entry_has_every_field(name: str) -> None:
    entry = METHODS[name]
    assert isinstance(entry, Method) and entry.name == name
    for field, kind in FIELD_TYPES.items():
        assert isinstance(getattr(entry, field), kind), field
    assert entry.label.strip() and callable(entry.builder)
    assert entry.adamw_weight_decay is None or entry.adamw_weight_decay >= 0
    assert entry.checkpoint in CHECKPOINT_KINDS
    assert list(entry.lr_grid) == sorted(entry.lr_grid) and all(lr > 0 for lr in entry.lr_grid)
    if entry.conll04:
        assert entry.default_lr == entry.lr_grid[(len(entry.lr_grid) - 1) // 2]
    if entry.calls_step:
        assert overridden(entry, "step"), "a method that calls step() must say what it does"
    if entry.refreshable:
        assert overridden(entry, "refresh")
    if entry.mask_settings:
        params = inspect.signature(entry.builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        assert takes_any or {"density", "update_every", "num_regressing"} <= set(params)
    if entry.fishdip_adapter:
        assert entry.calls_step, "the CoNLL'04 loop calls model.step() for FISH-DIP on purpose"


def test_labels_are_unique() -> None:
    labels = [m.label for m in METHODS.values()]
    assert len(labels) == len(set(labels))


def test_every_name_the_benchmarks_use_is_in_the_registry() -> None:
    used = {REFERENCE, FIXED_MASK}
    used |= set(run.METHODS) | set(run.LR_GRID) | set(run.QUICK["methods"]) | set(run.SEED_METHODS)
    used |= set(report.METHOD_ORDER) | set(report.METHOD_LABELS) | set(report.PAPER)
    used |= {method for method, _, _ in authors.METHODS.values()}
    used |= {authors.METHODS[name][0] for name in authors.LR_GRID}
    used |= set(EFFICIENCY_METHODS) | set(efficiency_cli.parse_args([]).methods)
    used |= {method for parts in efficiency_report.RATIOS.values() for method, _ in parts}
    assert used <= set(METHODS), used - set(METHODS)
    assert set(authors.FIRST) <= set(authors.METHODS)
    assert run.METHODS == CONLL04_METHODS and set(run.LR_GRID) == set(CONLL04_METHODS)
    assert report.METHOD_ORDER[: len(CONLL04_METHODS)] == CONLL04_METHODS  # figure colours follow this order
    assert METHODS[REFERENCE].conll04 and METHODS[REFERENCE].efficiency and METHODS[FIXED_MASK].conll04


def test_the_registry_reproduces_the_benchmarks_earlier_tables() -> None:
    """The CoNLL'04 grids, defaults, labels and FISH-DIP set as run.py, report.py and training.py had them."""
    assert CONLL04_METHODS == ("full-ft", "lora", "ia3", "prefix-tuning", "houlsby", "compacter", "fishdip",
                               "fixed-fish", "fishdip-no-sample-aware")
    assert run.DEFAULT_LR == {"full-ft": 1e-4, "lora": 3e-3, "ia3": 3e-2, "prefix-tuning": 3e-2, "houlsby": 1e-3,
                              "compacter": 1e-2, "fishdip": 1e-3, "fixed-fish": 1e-3, "fishdip-no-sample-aware": 1e-3}
    assert [n for n in CONLL04_METHODS if METHODS[n].fishdip_adapter] == ["fishdip", "fixed-fish",
                                                                          "fishdip-no-sample-aware"]
    assert [n for n in METHODS if METHODS[n].checkpoint == "adapterhub"] == ["houlsby", "compacter"]
    assert EFFICIENCY_METHODS == ("full-ft", "lora", "fishdip", "dense-mask")


def method_params():
    return [pytest.param(n, marks=NEEDS_ADAPTERS) if METHODS[n].checkpoint == "adapterhub" else n for n in METHODS]


@pytest.mark.parametrize("name", method_params())
def test_every_method_trains_saves_and_loads_through_its_hooks(name: str, tmp_path) -> None:
    entry = METHODS[name]
    prepared = entry.build(tiny_llama(), **entry.mask_overrides(0.05, 100, 2), **SMALL.get(name, {}))
    assert isinstance(prepared, PreparedMethod) and prepared.name == name and prepared.trainable_params > 0
    model = prepared.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=entry.adamw_weight_decay or 0.0)
    for seed in range(2):  # two steps, so zero-initialised halves of adapters move too
        batch = causal_batch(seed)
        outputs, losses = forward_with_per_sample_losses(model, batch)
        changed = entry.step(prepared, losses, batch) if entry.calls_step else None
        assert changed is None or isinstance(changed, bool)
        outputs.loss.backward()
        entry.after_backward(prepared)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.isfinite(outputs.loss)
    if entry.refreshable:
        batch = causal_batch(2)
        _, losses = forward_with_per_sample_losses(model, batch)
        entry.step(prepared, losses, batch)  # pools the samples
        entry.refresh(prepared)
    else:
        with pytest.raises(TypeError):
            entry.refresh(prepared)

    model.eval()
    probe = causal_batch(3)
    with torch.no_grad():
        expected = model(**probe).logits
    entry.save(prepared, tmp_path)
    stored = safetensors_entries(tmp_path)
    base = tiny_llama()
    loaded = entry.load(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**probe).logits, expected, rtol=1e-5, atol=1e-5)
    changed = entry.changed_entries(stored, loaded, base)  # a whole model is loaded anew: `base` is untouched
    assert 0 < changed <= sum(p.numel() for p in tiny_llama().parameters())

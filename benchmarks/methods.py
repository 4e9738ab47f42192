"""The one registry of the benchmarks' fine-tuning methods: `METHODS`, one `Method` entry per method.

An entry says everything the benchmarks need to know about a method: its builder
(`benchmarks.builders`), its display label, its CoNLL'04 learning-rate grid, and its behaviour in a
training step (`step` between forward and backward, `after_backward`, `refresh`) and in a checkpoint
(`save`, `load`, `changed_entries`). The CoNLL'04 runner, loop and report and the efficiency benchmark
read these attributes instead of testing method names. The kind of an entry (`Method`, `FishDipMethod`,
`DenseMaskMethod`) carries the behaviour; the entry itself only its data.

`REFERENCE` is the method the reports compare every other method against, `FIXED_MASK` its fixed-mask
counterpart (the CoNLL'04 report's Figure 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from benchmarks.builders import (
    PreparedMethod,
    compacter,
    count_trainable,
    dense_mask,
    fishdip,
    fishdip_no_sample_aware,
    fixed_fish,
    full_ft,
    houlsby,
    ia3,
    lora,
    prefix_tuning,
)

CHECKPOINT_KINDS = ("peft", "adapterhub", "full")


@dataclass(frozen=True)
class Method:
    """A method of the benchmarks (a plain one: no per-step hook, no mask to refresh).

    - `lr_grid`: the learning rates `python -m benchmarks.conll04.run --select-lr` tries, ascending; the
      middle one (the lower of the two middle ones) is the default until one is selected. Empty: not a
      CoNLL'04 method.
    - `efficiency`: measured by `python -m benchmarks.efficiency` unless `--methods` says otherwise.
    - `checkpoint`: what the method saves: "peft" (a peft adapter, `save_pretrained`), "adapterhub"
      (`save_adapter`, without the frozen head) or "full" (the whole model).
    - `fishdip_adapter`: the model is a FISH-DIP peft adapter: its m and n follow the step budget, its
      Adafactor is `SparseAdafactor`, its training state and re-scoring go through the tuner, and runs
      record K and the number of refreshes.
    - `calls_step`: the training loops call `step(prepared, per_sample_losses, batch)` between the forward
      pass and `backward()` (FISH-DIP would also run by itself from forwards with labels; the CoNLL'04 and
      efficiency loops call it on purpose, with the unpadded per-sample losses they compute).
    - `mask_settings`: takes `density`, `update_every` and `num_regressing` (the efficiency flags).
    - `adamw_weight_decay`: the efficiency benchmark's AdamW weight decay (None: torch's default, 0.01).
    """

    name: str
    label: str
    builder: Callable[..., PreparedMethod]
    lr_grid: tuple[float, ...] = ()
    efficiency: bool = False
    checkpoint: str = "peft"
    fishdip_adapter: bool = False
    calls_step: bool = False
    mask_settings: bool = False
    adamw_weight_decay: Optional[float] = None

    # -- data ---------------------------------------------------------------------------------------
    @property
    def conll04(self) -> bool:
        return bool(self.lr_grid)

    @property
    def default_lr(self) -> float:
        return self.lr_grid[(len(self.lr_grid) - 1) // 2]

    @property
    def defaults(self) -> dict[str, Any]:
        """The builder's keyword defaults (the hyperparameters a run without overrides uses)."""
        import inspect

        return {name: p.default for name, p in inspect.signature(self.builder).parameters.items()
                if p.default is not inspect.Parameter.empty}

    @property
    def trains_whole_model(self) -> bool:
        return self.checkpoint == "full"

    @property
    def refreshable(self) -> bool:
        """Whether `refresh` recomputes a mask (the efficiency benchmark times it)."""
        return False

    def mask_overrides(self, density: float, update_every: int, num_regressing: int) -> dict[str, Any]:
        """The builder overrides for these mask settings (none for a method without a mask)."""
        if not self.mask_settings:
            return {}
        return dict(density=density, update_every=update_every, num_regressing=num_regressing)

    # -- training -----------------------------------------------------------------------------------
    def build(self, model: nn.Module, **overrides: Any) -> PreparedMethod:
        """Prepare `model` for training with this method; `overrides` replace the builder's defaults."""
        prepared = self.builder(model, **overrides)
        prepared.name = self.name
        return prepared

    def step(self, prepared: PreparedMethod, losses, batch: Mapping[str, Any]) -> Optional[bool]:
        """Between forward and `backward()` (if `calls_step`): whether the mask changed (None: no mask)."""
        return None

    def after_backward(self, prepared: PreparedMethod) -> None:
        """After `backward()`, before the optimizer step."""

    def refresh(self, prepared: PreparedMethod) -> None:
        raise TypeError(f"{self.name} has no mask to refresh")

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self, prepared: PreparedMethod, folder: str | Path) -> None:
        model = prepared.model
        if self.checkpoint == "adapterhub":
            import inspect

            # The frozen LM head is not part of what the adapter trains: leave it out.
            kwargs = {"with_head": False} if "with_head" in inspect.signature(model.save_adapter).parameters else {}
            model.save_adapter(str(folder), self.name, use_safetensors=True, **kwargs)
        else:
            model.save_pretrained(str(folder))

    def load(self, base: nn.Module, folder: str | Path) -> nn.Module:
        """`base` (a fresh copy of the untrained model) with the checkpoint in `folder` applied; a whole
        model ("full") is loaded as a new model and leaves `base` untouched."""
        if self.checkpoint == "full":
            reference = next(base.parameters())
            return type(base).from_pretrained(str(folder), dtype=reference.dtype).to(reference.device)
        if self.checkpoint == "adapterhub":
            import adapters

            from benchmarks.builders import _route_kv_cache

            adapters.init(base)
            name = base.load_adapter(str(folder), set_active=True, use_safetensors=True)
            reference = next(p for n, p in base.named_parameters() if f".{name}." not in n)
            base.to(device=reference.device, dtype=reference.dtype)
            _route_kv_cache(base)
            return base
        from peft import PeftModel

        import fishdip_peft  # noqa: F401  (registers the FISH-DIP peft type)

        return PeftModel.from_pretrained(base, str(folder))

    def changed_entries(self, stored: Mapping[str, int], loaded: nn.Module, base: nn.Module) -> int:
        """Entries the checkpoint changes: from the stored tensors' sizes (`stored`: key -> entries) or, for
        a whole model, by comparing `loaded` with the untouched `base` (as `load` left it)."""
        if self.checkpoint != "full":
            return sum(stored.values())
        base_params = dict(base.named_parameters())
        return sum(int((p != base_params[name]).sum()) for name, p in loaded.named_parameters())


@dataclass(frozen=True)
class FishDipMethod(Method):
    """A FISH-DIP peft adapter (`fishdip_peft`), driven by `model.step(losses, batch)`."""

    fishdip_adapter: bool = True
    calls_step: bool = True
    mask_settings: bool = True

    @property
    def refreshable(self) -> bool:
        return True

    def step(self, prepared, losses, batch):
        return bool(prepared.model.step(losses, batch))

    def refresh(self, prepared) -> None:
        prepared.model.refresh_mask()

    def changed_entries(self, stored, loaded, base) -> int:
        return sum(v for k, v in stored.items() if k.endswith("fishdip_indices"))


@dataclass(frozen=True)
class DenseMaskMethod(Method):
    """A mask kept outside the model by `prepared.controller` (`benchmarks.dense_mask.DenseMaskFishDip`)."""

    checkpoint: str = "full"
    calls_step: bool = True
    mask_settings: bool = True
    adamw_weight_decay: Optional[float] = 0.0  # as the original code: momentum alone moves entries that left

    @property
    def refreshable(self) -> bool:
        return True

    def step(self, prepared, losses, batch):
        return prepared.controller.step(losses, batch)  # before backward: the refresh uses .grad

    def after_backward(self, prepared) -> None:
        prepared.controller.mask_gradients()

    def refresh(self, prepared) -> None:
        prepared.controller.refresh()


# CoNLL'04 learning-rate grids: AdamW, constant rate, batch 8, 30-80 steps. Centres from 12-step probes at 5%
# of train (training loss at step 12): full-ft 1e-4 -> 0.35, fishdip 1e-3 -> 0.37, lora 1e-3 -> 0.83 (too slow
# for the budget, so LoRA-like methods are centred at 3e-3). The FISH-DIP grids reach up to 1e-2, in case 1e-3
# was too low for the budget: its 40-step run at 5% ended at a last-batch loss of 0.108 against 0.020 (full-ft)
# and 0.030 (LoRA); over the last epoch the means are 0.043, 0.014 and 0.022. On dev, 1e-3 won (3e-3 scored
# lower, 1e-2 diverged). A grid whose best dev score fell on one of its ends was extended past it: (IA)3's to
# 1e-1 (best of 3e-3..3e-2 was 3e-2, dev F1 43.6 / 12.8), then 3e-1 (1e-1 gave 52.1 / 13.4), which moved its
# default from 1e-2 to 3e-2; prefix tuning's to 1e-1 (0 / 0 at 3e-3 and 1e-2, 13.7 / 0 at 3e-2, where its
# training loss was still 0.69 after 40 steps), then 3e-1 (1e-1 gave 18.8 / 1.4), which moved its default to
# 3e-2. Houlsby's was extended downwards to 3e-4, since its bottom value won (1e-3: 55.5 / 21.4, 3e-3: 58.6 /
# 18.1, 1e-2: 49.2 / 5.9); its default became 1e-3. Compacter's reaches 1e-1 (3e-3: 11.0 / 0, 1e-2: 34.7 / 7.8,
# 3e-2: 55.2 / 14.8).
FISHDIP_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
_ENTRIES = (
    Method("full-ft", "Full fine-tuning", full_ft, lr_grid=(3e-5, 1e-4, 3e-4), efficiency=True, checkpoint="full"),
    Method("lora", "LoRA", lora, lr_grid=(1e-3, 3e-3, 1e-2), efficiency=True),
    Method("ia3", "IA3", ia3, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    Method("prefix-tuning", "Prefix tuning", prefix_tuning, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1)),
    Method("houlsby", "Houlsby adapters", houlsby, lr_grid=(3e-4, 1e-3, 3e-3, 1e-2), checkpoint="adapterhub"),
    Method("compacter", "Compacter", compacter, lr_grid=(3e-3, 1e-2, 3e-2, 1e-1), checkpoint="adapterhub"),
    FishDipMethod("fishdip", "FISH-DIP", fishdip, lr_grid=FISHDIP_GRID, efficiency=True),
    FishDipMethod("fixed-fish", "FISH mask (fixed)", fixed_fish, lr_grid=FISHDIP_GRID),
    FishDipMethod("fishdip-no-sample-aware", "FISH-DIP w/o sample-awareness", fishdip_no_sample_aware,
                  lr_grid=FISHDIP_GRID),
    DenseMaskMethod("dense-mask", "Dense mask (original code)", dense_mask, efficiency=True),
)
METHODS: dict[str, Method] = {entry.name: entry for entry in _ENTRIES}
REFERENCE = "fishdip"
FIXED_MASK = "fixed-fish"
FISHDIP_METHODS = tuple(name for name, m in METHODS.items() if m.fishdip_adapter)
BASELINES = tuple(name for name, m in METHODS.items() if not m.fishdip_adapter)
CONLL04_METHODS = tuple(name for name, m in METHODS.items() if m.conll04)
EFFICIENCY_METHODS = tuple(name for name, m in METHODS.items() if m.efficiency)


def get_method(name: str) -> Method:
    """The registry entry of `name` (a ValueError naming the choices if there is none)."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def build_method(name: str, model: nn.Module, **overrides: Any) -> PreparedMethod:
    """Prepare `model` for training with the method `name`; `overrides` replace its defaults."""
    return get_method(name).build(model, **overrides)


__all__ = ["BASELINES", "CONLL04_METHODS", "EFFICIENCY_METHODS", "FISHDIP_METHODS", "FIXED_MASK", "METHODS",
           "REFERENCE", "DenseMaskMethod", "FishDipMethod", "Method", "PreparedMethod", "build_method",
           "count_trainable", "get_method"]

"""FishDipModel: the PEFT tuner that trains a dynamic sparse subset of a model's weights."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, set_additional_trainable_modules
from torch import nn

from . import formats
from .composition import add_weighted_adapter
from .config import FishDipConfig
from .eligibility import _matches, eligible_parameters
from .hooks import TapSet
from .layer import FishDipLayer
from .losses import per_sample_losses_from_outputs
from .lookup import fishdip_tuner
from .pool import RegressingPool
from .progress import AdapterProgress
from .activation import ActivationMixin
from .sparse import SparseAdapter
from .stepping import SteppingMixin


class FishDipModel(ActivationMixin, SteppingMixin, BaseTuner):
    """Sample-aware dynamic sparse fine-tuning (FISH-DIP, Das et al., EMNLP 2023) as a PEFT tuner.

    Each adapter keeps K = round(density · |θ|) entries of the eligible weights θ trainable and
    recomputes them every `update_every` optimizer steps from the empirical Fisher of the highest-loss
    samples. It runs by itself in any training loop whose forward passes carry `labels` (automatic
    mode); `step()` lets a loop pass its own per-sample losses instead. Use it through
    `peft.get_peft_model(model, FishDipConfig(...))`.
    """

    is_fishdip_tuner = True
    uses_shared_state = True  # masks, pools and schedules live on the tuner: peft refuses inject_adapter_in_model
    prefix: str = "fishdip_"
    tuner_layer_cls = nn.Module  # FISH-DIP replaces no layer: the trained entries live in the weights
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        self._install_hooks()

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `formats.save_training_state` wrote (see `formats.restore_training_state`)."""
        formats.restore_training_state(self, state)

    def _ensure_state(self) -> None:
        """Create the tuner's containers (at the first injection, which BaseTuner.__init__ runs)."""
        if "fishdip_layer" in self._modules:
            return
        self.fishdip_layer = FishDipLayer(self.active_adapters[0] if self.active_adapters else "default")
        self.fishdip_layer.__dict__["_owner"] = self
        self.sparse_adapters: dict[str, SparseAdapter] = {}
        self.progress: dict[str, AdapterProgress] = {}
        self.merged_adapters: list[str] = []
        self._overlay: list[str] = []  # the active adapters whose deltas are added to the weights
        self._disabled = False
        self._computing_fisher = False
        self._original_requires_grad: Optional[dict[str, bool]] = None
        self._per_sample_losses: Callable = per_sample_losses_from_outputs
        self.prepared_for_processes = False  # set by integrations.sync_initial_state
        this = weakref.ref(self)

        def tap_target():
            tuner = this()
            return tuner._tap_target() if tuner is not None else None

        self._taps = TapSet(tap_target)
        self._handles: list = []

    # -- injection ----------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        self._ensure_state()
        config: FishDipConfig = self.peft_config[adapter_name]
        if adapter_name in self.sparse_adapters:
            raise ValueError(f"an adapter named '{adapter_name}' exists already; pick another adapter_name.")
        named = eligible_parameters(model, config)
        total = sum(p.numel() for _, p in named)
        k = round(config.density * total)
        if k < 1:
            raise ValueError(f"density={config.density} keeps no entry of the {total} eligible ones; raise it.")
        if self._original_requires_grad is None:
            self._original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for name, param in model.named_parameters():
            if ".modules_to_save." not in name:  # other adapters' modules_to_save copies keep their flags
                param.requires_grad_(False)
        device = named[0][1].device
        values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device), requires_grad=False)
        self.fishdip_values[adapter_name] = values
        if self.fishdip_values[adapter_name] is not values:
            # low_cpu_mem_usage injects under accelerate's empty-weights context, which turns registered
            # parameters into meta tensors; FISH-DIP's K values are cheap and must be real from the start.
            self.fishdip_values._parameters[adapter_name] = values
        adapter = SparseAdapter(adapter_name, named, k, values)
        adapter.in_weights = False  # a new adapter has nothing to put into the weights yet
        self.sparse_adapters[adapter_name] = adapter
        self.progress[adapter_name] = AdapterProgress(RegressingPool(config.num_regressing, config.sample_aware,
                                                                     config.seed))
        self._taps.cover(model, [p for _, p in named])
        self.targeted_parameter_names = sorted({n for a in self.sparse_adapters.values() for n in
                                                (s.name for s in a.slots)})
        if adapter_name in self.active_adapters:
            self._activate(adapter_name, trainable=not config.inference_mode)
        if not config.init_weights:
            self._random_start(adapter_name)
        set_additional_trainable_modules(model=model, peft_config=config, model_config=BaseTuner.get_model_config(self),
                                         adapter_name=adapter_name, activate_adapter=adapter_name in self.active_adapters)

    def _random_start(self, adapter_name: str) -> None:
        """`init_weights=False` (peft's switch for tests): a random first mask with small random deltas."""
        config, adapter = self.peft_config[adapter_name], self.sparse_adapters[adapter_name]
        generator = torch.Generator().manual_seed(config.seed)
        picked = torch.randperm(adapter.num_eligible, generator=generator)[: adapter.k].sort().values
        with self._weights_of(adapter_name):
            adapter.set_selection([picked[(picked >= s.flat_offset) & (picked < s.flat_offset + s.numel)]
                                   - s.flat_offset for s in adapter.slots])
            with torch.no_grad():
                noise = torch.randn(adapter.k, generator=generator) * 0.1
                adapter.values.add_(noise.to(adapter.values.device))
            adapter.write_back(force=True)
        self.progress[adapter_name].refreshed()

    @property
    def fishdip_values(self) -> nn.ParameterDict:
        """Every adapter's trainable values, by adapter name."""
        return self.fishdip_layer.fishdip_values

    # -- the active adapter -------------------------------------------------------------------
    @property
    def fishdip_state(self) -> SparseAdapter:
        """The active adapter's sparse state (`values`, `slots`, `k`, `mask`)."""
        return self.sparse_adapters[self._single_active()]

    def _single_active(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise ValueError(f"FISH-DIP runs one active adapter at a time; active: {active}. Use set_adapter(name).")
        return active[0]

    def _tap_target(self) -> Optional[SparseAdapter]:
        """The adapter whose values get gradients now: the active one, while it trains."""
        if self._disabled or self._computing_fisher or not torch.is_grad_enabled():
            return None
        active = self.active_adapters
        if len(active) != 1 or active[0] not in self.sparse_adapters:
            return None
        adapter = self.sparse_adapters[active[0]]
        if not adapter.values.requires_grad or not adapter.in_weights or active[0] in self.merged_adapters:
            return None
        return adapter

    # -- public state ---------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        """Flat boolean mask over the active adapter's eligible entries (built on demand)."""
        return self.fishdip_state.mask

    def eligible_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """`(name, tensor)` of the active adapter's eligible weights in mask order; they hold its values."""
        adapter = self.fishdip_state
        adapter.write_back()
        return [(slot.name, slot.param) for slot in adapter.slots]

    @property
    def num_trainable(self) -> int:
        """K, the number of trainable entries of the active adapter."""
        return self.fishdip_state.k

    @property
    def refresh_count(self) -> int:
        return self.progress[self._single_active()].refreshes

    @property
    def step_count(self) -> int:
        """Optimizer steps taken with the active adapter's values."""
        return self.progress[self._single_active()].optimizer_steps

    def pool_losses(self) -> list[float]:
        """Losses of the samples pooled since the last refresh, highest first (empty if not sample-aware)."""
        return self.progress[self._single_active()].pool.losses()

    def set_per_sample_losses(self, losses_fn: Callable) -> None:
        """`losses_fn(model, outputs, batch) -> (batch,)` for automatic mode and re-scoring (default: the
        language-model or classification losses of `losses.per_sample_losses_from_outputs`)."""
        self._per_sample_losses = lambda model, outputs, labels: losses_fn(model, outputs, {"labels": labels})

    # -- peft API -------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config

    def _check_target_module_exists(self, peft_config, key):
        return peft_config.target_modules is None or _matches(key, peft_config.target_modules)

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("FISH-DIP trains weights in place; it replaces no module.")

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        pass

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """float32 trainable values by default (peft's autocast); with `autocast_adapter_dtype=False` the
        values take the dtype of the weights they train."""
        adapter = self.sparse_adapters[adapter_name]
        dtype = torch.float32 if autocast_adapter_dtype else adapter.slots[0].param.dtype
        if adapter.values.dtype != dtype:
            with torch.no_grad():
                adapter.values.data = adapter.values.data.to(dtype)

    def _check_new_adapter_config(self, config) -> None:
        pass

    def _detach(self) -> nn.Module:
        self._taps.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.sparse_adapters, self.progress, self._overlay = {}, {}, []
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.sparse_adapters:
            raise ValueError(f"unknown adapter '{adapter_name}'; this model has {list(self.sparse_adapters)}.")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        active = self._active_fishdip()
        self._clear_overlay()
        self.sparse_adapters[adapter_name].remove_from_weights()
        del self.sparse_adapters[adapter_name], self.progress[adapter_name], self.fishdip_values[adapter_name]
        del self.peft_config[adapter_name]
        if adapter_name in active:
            remaining = [n for n in active if n != adapter_name] or list(self.sparse_adapters)[:1]
            if remaining:
                self.set_adapter(remaining if len(remaining) > 1 else remaining[0], inference_mode=True)
            else:
                self.active_adapter = self.fishdip_layer._active_adapter = []
        elif len(active) > 1:
            self._apply_overlay(active)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """A new adapter whose deltas are Σ weight_i · delta_i of `adapters` (composable sparse fine-tuning,
        Ansell et al. 2022). It holds no mask: training it builds one. The adapters must share their
        eligible weights; the new one takes the first adapter's config."""
        add_weighted_adapter(self, adapters, weights, adapter_name)

    # -- checkpoint ----------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tensors = formats.adapter_state_dict(fishdip_tuner(model).sparse_adapters[adapter_name], config.delta_dtype,
                                             config.to_json())
        formats.write_next_adapter_file_atomically()
        return tensors

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = fishdip_tuner(model)
        ours = {k: v for k, v in state_dict.items() if formats.is_fishdip_key(k)}
        others = {k: v for k, v in state_dict.items() if ".modules_to_save." in k}  # peft's dense copies
        unknown = sorted(set(state_dict) - set(ours) - set(others))
        if unknown:
            tuner._forget_refused_adapter(adapter_name)
            raise ValueError(f"'{unknown[0]}' is not a FISH-DIP sparse-delta entry nor a modules_to_save copy; "
                             "is this a FISH-DIP adapter file? Nothing was changed.")
        try:
            tuner.load_adapter_deltas(adapter_name, ours)
        except Exception:
            tuner._forget_refused_adapter(adapter_name)
            raise
        # The deltas are now in the weights; peft's load_state_dict gets `values` itself, left as it is.
        values_key = next(n for n, p in model.named_parameters() if p is tuner.fishdip_values[adapter_name])
        return {**others, values_key: tuner.fishdip_values[adapter_name]}

    def _forget_refused_adapter(self, adapter_name: str) -> None:
        """After a refused load: drop the adapter; if it was the only one, leave the base model exactly as it
        was before peft wrapped it (no hooks, its own requires_grad flags, no peft_config attribute)."""
        if len(self.sparse_adapters) > 1:
            self.delete_adapter(adapter_name)
            return
        for adapter in self.sparse_adapters.values():
            adapter.remove_from_weights()
        original = self._original_requires_grad or {}
        self._detach()
        for name, param in self.model.named_parameters():
            param.requires_grad_(original.get(name, param.requires_grad))

    def load_adapter_deltas(self, adapter_name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Apply an adapter file's deltas to `adapter_name` (fresh, nothing touched) and restore its mask."""
        adapter = self.sparse_adapters[adapter_name]
        progress = self.progress[adapter_name]
        untrained = progress.optimizer_steps == 0 and adapter.grad_writes == 0
        if untrained and not self.peft_config[adapter_name].init_weights:
            with self._weights_of(adapter_name):  # the random start of init_weights=False gives way to the file
                adapter.reset()
            self.progress[adapter_name] = AdapterProgress(progress.pool)
        elif any(slot.num_touched for slot in adapter.slots):
            warnings.warn(f"adapter '{adapter_name}' already holds deltas; loading its file again changes nothing.")
            return
        with self._weights_of(adapter_name):
            selection = formats.apply_adapter_state_dict(adapter, dict(tensors))
            if sum(t.numel() for t in selection) == adapter.k:
                adapter.set_selection(selection)
                self.progress[adapter_name].refreshed()

"""FishDipModel: the PEFT tuner that trains a dynamic sparse subset of a model's weights."""

from __future__ import annotations

import inspect
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import distributed, formats
from .config import FishDipConfig
from .fisher import empirical_fisher, trim_right_padding
from .hooks import TapSet
from .layer import FishDipLayer
from .losses import per_sample_losses_from_outputs
from .lookup import fishdip_tuner  # noqa: F401 (re-exported: the helper that finds the tuner)
from .pool import RegressingPool, batch_size_of
from .progress import AdapterProgress
from .selection import global_topk_indices
from .sparse import SparseAdapter


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


class FishDipModel(BaseTuner):
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

    def _ensure_state(self) -> None:
        """Create the tuner's containers (at the first injection, which BaseTuner.__init__ runs)."""
        if "fishdip_layer" in self._modules:
            return
        self.fishdip_layer = FishDipLayer(self.active_adapters[0] if self.active_adapters else "default")
        self.sparse_adapters: dict[str, SparseAdapter] = {}
        self.progress: dict[str, AdapterProgress] = {}
        self.merged_adapters: list[str] = []
        self._disabled = False
        self._computing_fisher = False
        self._original_requires_grad: Optional[dict[str, bool]] = None
        self._per_sample_losses: Callable = per_sample_losses_from_outputs
        self.prepared_for_processes = False  # set by integrations.sync_initial_state
        this = weakref.ref(self)
        self._taps = TapSet(lambda: (lambda tuner: tuner._tap_target() if tuner is not None else None)(this()))
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
        for param in model.parameters():
            param.requires_grad_(False)
        device = named[0][1].device
        values = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device), requires_grad=False)
        adapter = SparseAdapter(adapter_name, named, k, values)
        adapter.in_weights = False  # a new adapter has nothing to put into the weights yet
        self.fishdip_values[adapter_name] = values
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

    def _install_hooks(self) -> None:
        this = weakref.ref(self)

        @torch.compiler.disable
        def after_forward(module, args, kwargs, output):
            tuner = this()
            if tuner is not None:
                tuner._after_training_forward(args, kwargs, output)

        def before_optimizer_step(optimizer, args, kwargs):
            tuner = this()
            if tuner is not None:
                tuner._before_optimizer_step(optimizer)

        def after_optimizer_step(optimizer, args, kwargs):
            tuner = this()
            if tuner is not None:
                tuner._after_optimizer_step(optimizer)

        self._handles = [
            self.model.register_forward_hook(after_forward, with_kwargs=True),
            register_optimizer_step_pre_hook(before_optimizer_step),
            register_optimizer_step_post_hook(after_optimizer_step),
        ]
        for handle in self._handles:  # the process-wide optimizer hooks go away with this model
            weakref.finalize(self, handle.remove)

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

    def _activate(self, adapter_name: str, trainable: bool) -> None:
        for name, other in self.sparse_adapters.items():
            if name != adapter_name:
                other.remove_from_weights()
                other.values.requires_grad_(False)
        adapter = self.sparse_adapters[adapter_name]
        if not self._disabled:
            adapter.put_into_weights()
        adapter.values.requires_grad_(trainable)

    class _WeightsOf:
        def __init__(self, tuner, adapter_name):
            self.tuner, self.name = tuner, adapter_name

        def __enter__(self):
            self.was = {n: a.in_weights for n, a in self.tuner.sparse_adapters.items()}
            for name, adapter in self.tuner.sparse_adapters.items():
                if name != self.name:
                    adapter.remove_from_weights()
            self.tuner.sparse_adapters[self.name].put_into_weights()

        def __exit__(self, *exc):
            for name, adapter in self.tuner.sparse_adapters.items():
                if not self.was.get(name, False):
                    adapter.remove_from_weights()
            for name, adapter in self.tuner.sparse_adapters.items():
                if self.was.get(name, False):
                    adapter.put_into_weights()

    def _weights_of(self, adapter_name: str) -> "_WeightsOf":
        """Within it, the weights hold `adapter_name`'s values (and no other adapter's)."""
        return self._WeightsOf(self, adapter_name)

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

    # -- automatic mode -------------------------------------------------------------------------
    def _after_training_forward(self, args, kwargs, output) -> None:
        if not (self.model.training and torch.is_grad_enabled()) or self._tap_target() is None:
            return
        name = self._single_active()
        progress = self.progress[name]
        if progress.manual:
            return
        self._check_processes()
        batch = _model_inputs(self.model, args, kwargs)
        if "labels" not in batch:
            return
        losses = self._per_sample_losses(self.model, output, batch["labels"])
        self.offer(losses, batch)
        if progress.forwards_since_step == 0:
            self._refresh_if_due(name)
        progress.forwards_since_step += 1

    def _before_optimizer_step(self, optimizer) -> None:
        for name, adapter in self.sparse_adapters.items():
            if adapter.values.requires_grad and adapter.holds_values(optimizer) and not adapter.has_selection:
                if self.progress[name].attempts:
                    warnings.warn(f"FISH-DIP adapter '{name}' has no mask yet (its first refresh was skipped: see the "
                                  "warning above), so this optimizer step trains nothing; it retries at the next step.")
                    continue
                raise RuntimeError(
                    f"FISH-DIP adapter '{name}' has no mask yet, so this optimizer step would train nothing. "
                    "FISH-DIP builds its mask by itself from training forward passes that carry `labels` "
                    "(model(**batch) with batch['labels'], as the Trainer does). If your loop computes the loss "
                    "outside the model, call model.step(per_sample_losses, batch) before optimizer.step()."
                )

    def _after_optimizer_step(self, optimizer) -> None:
        for name, adapter in self.sparse_adapters.items():
            if adapter.holds_values(optimizer):
                adapter.register_optimizer(optimizer)
                adapter.write_back(force=True)  # fused optimizers do not bump `values._version`
                if adapter.values.requires_grad:
                    self.progress[name].optimizer_steps += 1
                    self.progress[name].forwards_since_step = 0

    # -- the FISH-DIP step ----------------------------------------------------------------------
    def step(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> bool:
        """Pool this step's samples with their losses and, when due, recompute the mask.

        For loops that compute the per-sample losses themselves (FISH-DIP otherwise runs by itself): call
        it once per optimizer step with `losses`, one loss per sample (1-D, e.g. from
        `forward_with_per_sample_losses`), and `batch`, the model-input dict of that step (same leading
        size, with `labels`), between the forward pass and `backward()`, so a new mask applies to this
        step's update. The first call builds the first mask; later ones refresh it at the first call after
        every `update_every` optimizer steps (never, if `dynamic=False`); calling it twice in one
        optimizer step refreshes at most once. Once called, automatic mode stops for this adapter.
        Returns True if the mask changed.
        """
        name = self._single_active()
        self._check_trainable(name)
        self._check_processes()
        self.progress[name].manual = True
        self.offer(losses, batch)
        return self._refresh_if_due(name)

    def offer(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Pool the samples of `batch` (with gradient accumulation: the micro-batches other than the one
        passed to `step`). Non-finite losses are not pooled (with a warning)."""
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError(
                f"losses must be a 1-D tensor with one loss per sample, got "
                f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}. "
                "Use fishdip_peft.forward_with_per_sample_losses to compute them."
            )
        size = batch_size_of(batch)
        if losses.numel() != size:
            raise ValueError(f"got {losses.numel()} losses for a batch of {size} samples; pass one loss per sample.")
        if "labels" not in batch:
            raise ValueError("the batch needs `labels`: the Fisher pass computes each pooled sample's loss.")
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            warnings.warn(f"{int((~finite).sum())} non-finite per-sample losses; those samples are not pooled.")
        if bool(finite.any()):
            keep = torch.nonzero(finite).flatten()
            pooled = batch if bool(finite.all()) else _select_rows(batch, keep, size)
            self.progress[self._single_active()].pool.offer(losses.detach()[keep], pooled)

    def _check_processes(self) -> None:
        if distributed.is_multi_process() and not self.prepared_for_processes:
            raise RuntimeError(
                "FISH-DIP runs in several processes only through FishDipTrainer or "
                "fishdip_peft.prepare_with_accelerator(accelerator, model, optimizer, ...): its values get their "
                "gradient outside autograd, which DistributedDataParallel cannot average, so the model must stay "
                "unwrapped. Use FishDipTrainer in place of Trainer (or SFTTrainer's model with FishDipTrainer)."
            )

    def _check_trainable(self, name: str) -> None:
        if self._disabled:
            raise RuntimeError("the adapter is disabled (inside disable_adapter()): leave it before training steps.")
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter '{name}' is merged: unmerge_adapter() before training it.")

    def _refresh_if_due(self, name: str) -> bool:
        config, progress = self.peft_config[name], self.progress[name]
        if not progress.refresh_due(config.dynamic, config.update_every):
            return False
        return self.refresh_mask()

    def set_rescoring(self, batches, losses_fn: Optional[Callable] = None) -> None:
        """Rank samples by re-scoring the training set at every refresh and for the first mask, as the
        authors' code does, instead of by the losses seen in training batches.

        `batches` is a re-iterable of training batches (e.g. a DataLoader without shuffling; with several
        processes, each process's own shard) or a callable returning one; `None` turns it off.
        `losses_fn(model, outputs, batch)` gives one loss per sample (default: as in automatic mode).
        """
        progress = self.progress[self._single_active()]
        progress.rescoring = None if batches is None else (batches, losses_fn)

    @torch.no_grad()
    def rescore(self, batches: Iterable[Mapping[str, Any]], losses_fn: Optional[Callable] = None) -> int:
        """Empty the pool and refill it with the samples of `batches`, scored with the current weights
        (eval mode, no gradient). Returns the number of samples scored."""
        name = self._single_active()
        self.progress[name].pool.clear()
        training = [(m, m.training) for m in self.model.modules()]
        scored = 0
        try:
            self.model.eval()
            for batch in batches:
                batch = distributed.to_device(dict(batch), self.sparse_adapters[name].values.device)
                if "labels" not in batch:
                    raise ValueError("re-scoring needs `labels` in every batch of the training set.")
                outputs = self.model(**batch)
                if losses_fn is not None:
                    losses = losses_fn(self.model, outputs, batch)
                else:
                    losses = self._per_sample_losses(self.model, outputs, batch["labels"])
                self.offer(losses, batch)
                scored += losses.numel()
        finally:
            for module, was_training in training:
                module.training = was_training
        return scored

    def refresh_mask(self) -> bool:
        """Recompute the active adapter's mask from its pooled samples now and empty the pool (re-scoring
        the training set first if `set_rescoring` was given one).

        With several processes (torch.distributed initialized), every process must call it: the Fisher
        is that of the top-n samples of all processes' pools and every process gets the same mask. A
        refresh that cannot be made (no pooled sample, a non-finite Fisher) keeps the current mask; if
        there is none yet, the next training step tries again.
        """
        name = self._single_active()
        self._check_trainable(name)
        adapter, progress = self.sparse_adapters[name], self.progress[name]
        progress.attempts += 1
        if progress.rescoring is not None:
            batches, losses_fn = progress.rescoring
            self.rescore(batches() if callable(batches) else batches, losses_fn)
        params = [slot.param for slot in adapter.slots]
        pooled = progress.pool.state_dict()
        try:
            return self._refresh_from_pool(adapter, progress, params)
        except BaseException:
            progress.pool.load_state_dict(pooled)  # a failed refresh leaves the pool as it was
            raise

    def _refresh_from_pool(self, adapter: SparseAdapter, progress: AdapterProgress, params) -> bool:
        if distributed.is_multi_process():
            samples, total = distributed.my_share_of_pool(progress.pool, adapter.values.device)
        else:
            samples = progress.pool.drain()
            total = len(samples)
        if total == 0:
            warnings.warn("no finite-loss sample was pooled since the last refresh; the mask is kept.")
            return False
        scores = self._fisher_sum(samples, params)
        if distributed.is_multi_process():
            scores = distributed.sum_across_processes(scores, params)  # a failure anywhere becomes NaN
        if scores is None or not all(bool(torch.isfinite(s).all()) for s in scores):
            warnings.warn("mask refresh skipped: the Fisher information is not finite.")
            return False
        for score in scores:
            score.div_(total)
        changed = adapter.set_selection(global_topk_indices(scores, adapter.k))
        progress.refreshed()
        return changed

    def _fisher_sum(self, samples, params) -> Optional[list[torch.Tensor]]:
        """Σ (∇ℓ)² over `samples` (zeros if there are none), or None if a sample's loss is not finite."""
        if not getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
            samples = [trim_right_padding(s) for s in samples]
        self.fishdip_state.write_back()
        self._computing_fisher = True
        try:
            return empirical_fisher(self.model, samples, params, mean=False)
        except FloatingPointError as error:
            warnings.warn(f"mask refresh skipped: {error}")
            return None
        finally:
            self._computing_fisher = False

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

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"FISH-DIP runs one active adapter at a time; got {names}.")
        if names[0] not in self.sparse_adapters:
            raise ValueError(f"unknown adapter '{names[0]}'; this model has {list(self.sparse_adapters)}.")
        self.active_adapter = names[0]
        self.fishdip_layer.set_adapter(names[0])
        self._activate(names[0], trainable=not inference_mode)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.sparse_adapters[name].values.requires_grad_(requires_grad)

    def disable_adapter_layers(self) -> None:
        if not self._disabled:
            for adapter in self.sparse_adapters.values():
                adapter.remove_from_weights()
            self._disabled = True
            self.fishdip_layer.enable_adapters(False)

    def enable_adapter_layers(self) -> None:
        if self._disabled:
            self._disabled = False
            self.fishdip_layer.enable_adapters(True)
            active = [n for n in self.active_adapters if n in self.sparse_adapters]
            if active:
                self.sparse_adapters[active[0]].put_into_weights()

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """The active adapter's deltas already live in the weights; merging marks them as part of the
        model, so it stops training until `unmerge_adapter()`."""
        name = self._single_active()
        if name in self.merged_adapters:
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        self.enable_adapter_layers()
        self.sparse_adapters[name].write_back()
        self.merged_adapters.append(name)
        self.fishdip_layer.merged_adapters = list(self.merged_adapters)

    def unmerge_adapter(self) -> None:
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
        self.merged_adapters = []
        self.fishdip_layer.merged_adapters = []

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The base model with the active adapter's trained values in its weights and no FISH-DIP state."""
        self.enable_adapter_layers()
        name = self._single_active()
        self._activate(name, trainable=False)
        self.sparse_adapters[name].write_back()
        return self._detach()

    def unload(self) -> nn.Module:
        """The base model with its original weights, bit for bit, and no FISH-DIP state."""
        self.enable_adapter_layers()
        for adapter in self.sparse_adapters.values():
            adapter.remove_from_weights()
        return self._detach()

    def _detach(self) -> nn.Module:
        self._taps.remove()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.sparse_adapters, self.progress = {}, {}
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.sparse_adapters:
            raise ValueError(f"unknown adapter '{adapter_name}'; this model has {list(self.sparse_adapters)}.")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first.")
        self.sparse_adapters[adapter_name].remove_from_weights()
        del self.sparse_adapters[adapter_name], self.progress[adapter_name], self.fishdip_values[adapter_name]
        del self.peft_config[adapter_name]
        if adapter_name in self.active_adapters:
            remaining = list(self.sparse_adapters)
            self.active_adapter = remaining[:1]
            self.fishdip_layer.set_adapter(remaining[:1])
            if remaining:
                self._activate(remaining[0], trainable=False)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """A new adapter whose deltas are Σ weight_i · delta_i of `adapters` (composable sparse fine-tuning,
        Ansell et al. 2022). It holds no mask: training it builds one. The adapters must share their
        eligible weights; the new one takes the first adapter's config."""
        from .composition import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name)

    # -- checkpoint ----------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tensors = formats.adapter_state_dict(fishdip_tuner(model).sparse_adapters[adapter_name], config.delta_dtype)
        formats.write_next_adapter_file_atomically()
        return tensors

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = fishdip_tuner(model)
        ours = {k: v for k, v in state_dict.items()
                if k.rpartition(".")[2] in formats.FIELDS or k == formats.MANIFEST_KEY}
        others = {k: v for k, v in state_dict.items() if k not in ours}  # e.g. modules_to_save copies
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
        if adapter.values.is_meta:  # created under low_cpu_mem_usage: give it real storage
            adapter.values.data = torch.zeros(adapter.k, dtype=adapter.values.dtype, device=adapter.slots[0].param.device)
        if any(slot.touched.numel() for slot in adapter.slots):
            warnings.warn(f"adapter '{adapter_name}' already holds deltas; loading its file again changes nothing.")
            return
        with self._weights_of(adapter_name):
            selection = formats.apply_adapter_state_dict(adapter, dict(tensors))
            if sum(t.numel() for t in selection) == adapter.k:
                adapter.set_selection(selection)
                self.progress[adapter_name].refreshed()

    # -- resumable training state --------------------------------------------------------------
    def load_training_state(self, state: Mapping[str, Any]) -> None:
        """Restore what `formats.save_training_state` wrote: for every adapter, the weights at every entry
        it ever trained, its values, mask, pool and schedule. Every check runs before anything changes."""
        if self._disabled:
            raise RuntimeError("enable the adapter (leave disable_adapter()) before loading a training state.")
        saved = state["adapters"]
        if set(saved) != set(self.sparse_adapters):
            raise ValueError(f"the training state holds adapters {sorted(saved)}; this model has "
                             f"{sorted(self.sparse_adapters)}.")
        for name, entry in saved.items():
            _check_training_state(self.sparse_adapters[name], entry)
        for name, entry in saved.items():
            adapter, progress = self.sparse_adapters[name], self.progress[name]
            with self._weights_of(name):
                adapter.restore(entry["index"], entry["touched"], entry["base"], entry["trained"], entry["values"])
            progress.load_state_dict(entry["progress"])
            pool_state = distributed.pool_state_for_this_process(entry["pools"], progress.pool.capacity)
            progress.pool.load_state_dict(distributed.to_device(pool_state, adapter.values.device))


def _check_training_state(adapter: SparseAdapter, entry: Mapping[str, Any]) -> None:
    names, shapes = [s.name for s in adapter.slots], [tuple(s.param.shape) for s in adapter.slots]
    if list(entry["names"]) != names or [tuple(s) for s in entry["shapes"]] != shapes:
        raise ValueError("the training state is for other eligible weights (another model or target_modules).")
    if entry["values"].numel() != adapter.k:
        raise ValueError(f"the training state has {entry['values'].numel()} trainable values; this model has "
                         f"K={adapter.k}.")
    for slot, touched, base in zip(adapter.slots, entry["touched"], entry["base"]):
        if base.dtype != slot.param.dtype:
            raise ValueError(f"'{slot.name}' is {slot.param.dtype} here but was {base.dtype} in training; "
                             "load the same dtype.")
        if not torch.equal(slot.base_values_at(touched.to(slot.param.device)).cpu(), base):
            raise ValueError(f"the base values of '{slot.name}' differ from those the training state was made "
                             "from: this is not the same base model. Nothing was changed.")


_FORWARD_PARAMETERS: "weakref.WeakKeyDictionary[nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def _model_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward's tensor inputs by name (positional ones named from the signature), batch-sized only."""
    if model not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[model] = list(inspect.signature(model.forward).parameters)
    named = dict(zip(_FORWARD_PARAMETERS[model], args))
    named.update(kwargs)
    tensors = {k: v for k, v in named.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    labels = tensors.get("labels")
    size = labels.shape[0] if labels is not None else None
    return {k: v for k, v in tensors.items() if size is None or v.shape[0] == size}


def _select_rows(batch: Mapping[str, Any], rows: torch.Tensor, size: int) -> dict[str, Any]:
    return {
        k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }

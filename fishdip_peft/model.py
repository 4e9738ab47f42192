"""FishDipModel: the PEFT tuner that trains a dynamic sparse subset of a model's weights."""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import checkpoint, distributed
from .config import FishDipConfig
from .fisher import empirical_fisher, trim_right_padding
from .losses import per_sample_losses_from_outputs
from .pool import RegressingPool, batch_size_of
from .selection import global_topk_indices
from .sparse import GradientTap, SparseTrainingState


def _matches(module_name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, module_name) is not None
    return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def _eligible_parameters(model: nn.Module, config: FishDipConfig) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the targeted modules, in `named_parameters` order, tied weights once."""
    owner_of = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owner_of.setdefault(id(param), module_name)
    targeted, named = set(), []
    for name, param in model.named_parameters():
        owner = owner_of[id(param)]
        if config.target_modules is not None and not _matches(owner, config.target_modules):
            continue
        targeted.add(owner)
        if config.exclude_modules is not None and _matches(owner, config.exclude_modules):
            continue
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

    A flat boolean mask keeps K = round(density · |θ|) entries of the eligible weights θ trainable.
    Call [`step`] once per optimizer step with the per-sample losses; every `update_every` calls it
    recomputes the mask from the empirical Fisher of the highest-loss samples seen since the last
    refresh. Use it through `peft.get_peft_model(model, FishDipConfig(...))`.
    """

    prefix: str = "fishdip_"
    tuner_layer_cls = SparseTrainingState
    target_module_mapping: dict = {}

    # -- injection ----------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("FishDipModel supports a single adapter; unload() before adding another.")
        config: FishDipConfig = self.peft_config[adapter_name]
        named = _eligible_parameters(model, config)
        total = sum(p.numel() for _, p in named)
        k = round(config.density * total)
        if k < 1:
            raise ValueError(f"density={config.density} keeps no entry of the {total} eligible ones; raise it.")
        self._original_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(False)
        self.fishdip_state = SparseTrainingState(named, k, trainable=not config.inference_mode, adapter_name=adapter_name)
        self._pool = RegressingPool(config.num_regressing, config.sample_aware, config.seed)
        self._steps = 0
        self._refreshes = 0
        self._adapters_disabled_stash = None
        self._computing_fisher = False
        self._warned_no_mask = False
        self._rescoring = None
        self._hooks = self._register_hooks(model)
        self.targeted_parameter_names = [name for name, _ in named]

    def _register_hooks(self, model: nn.Module) -> list:
        slot_of = {id(slot.param): slot for slot in self.fishdip_state.slots}
        hooks = [model.register_forward_pre_hook(self._before_model_forward)]
        for module in model.modules():
            owned = [(attr, slot_of[id(p)]) for attr, p in module._parameters.items() if p is not None and id(p) in slot_of]
            if owned:
                hooks.append(module.register_forward_pre_hook(self._make_tap_hook(owned)))
                hooks.append(module.register_forward_hook(self._make_untap_hook(owned), always_call=True))
        this = weakref.ref(self)

        def after_optimizer_step(optimizer, args, kwargs):
            tuner = this()
            if tuner is not None:
                tuner._after_optimizer_step(optimizer)

        hooks.append(register_optimizer_step_post_hook(after_optimizer_step))
        return hooks

    def _taps_active(self) -> bool:
        return (
            torch.is_grad_enabled()
            and self.fishdip_state.values.requires_grad
            and self._adapters_disabled_stash is None
            and not self._computing_fisher
        )

    def _make_tap_hook(self, owned):
        def tap(module, args):
            if not self._taps_active():
                return
            refresh_next = self._refresh_due(self._steps + 1)
            for attr, slot in owned:
                if slot.index.numel() or refresh_next:
                    module._parameters[attr] = GradientTap.apply(slot.param, self.fishdip_state.values, slot, self.fishdip_state)

        return tap

    @staticmethod
    def _make_untap_hook(owned):
        def untap(module, args, output):
            for attr, slot in owned:
                module._parameters[attr] = slot.param

        return untap

    def _before_model_forward(self, module, args):
        self.fishdip_state.write_back()

    def _after_optimizer_step(self, optimizer) -> None:
        values = self.fishdip_state.values
        if any(p is values for group in optimizer.param_groups for p in group["params"]):
            if self._refreshes == 0 and not self._warned_no_mask:
                self._warned_no_mask = True
                warnings.warn(
                    "optimizer.step() ran before any mask was built, so nothing was trained: call "
                    "model.step(per_sample_losses, batch) once per training step, before optimizer.step()."
                )
            self.fishdip_state.write_back(force=True)  # fused optimizers do not bump `values._version`
            if not any(ref() is optimizer for ref in self.fishdip_state.optimizers):
                self.fishdip_state.optimizers.append(weakref.ref(optimizer))

    # -- public state ---------------------------------------------------------------------------
    @property
    def mask(self) -> torch.Tensor:
        """Flat boolean mask over all eligible entries (in `eligible_parameters()` order)."""
        return self.fishdip_state.mask

    def eligible_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """`(name, tensor)` of the eligible weights in mask order; they hold the trained values."""
        self.fishdip_state.write_back()
        return [(slot.name, slot.param) for slot in self.fishdip_state.slots]

    @property
    def num_trainable(self) -> int:
        """K, the number of trainable entries."""
        return self.fishdip_state.k

    @property
    def refresh_count(self) -> int:
        return self._refreshes

    @property
    def step_count(self) -> int:
        """Number of `step()` calls so far."""
        return self._steps

    def pool_losses(self) -> list[float]:
        """Losses of the samples pooled since the last refresh, highest first (empty if not sample-aware)."""
        return self._pool.losses()

    # -- the FISH-DIP step ----------------------------------------------------------------------
    def _refresh_due(self, call: int) -> bool:
        config = self.peft_config[self.active_adapter]
        if call == 1:
            return True
        return config.dynamic and (call - 1) % config.update_every == 0

    def step(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> bool:
        """Record this training step's samples and, when due, recompute the mask.

        Call once per optimizer step with `losses`, the per-sample losses (1-D, one per sample, e.g.
        from `forward_with_per_sample_losses`), and `batch`, the model-input dict of that step
        (same leading size, with `labels`). The first call builds the first mask; then every
        `update_every`-th call refreshes it (never, if `dynamic=False`). Returns True if the mask
        changed.

        Order: call it between the forward pass and `backward()` (the paper's order): a mask built
        there applies to this step's update, since the backward reads the mask when it runs. Calling
        it after `backward()` also works, but on a refresh step the entries new to the mask get no
        gradient for that one step (their dense gradient is gone by then). Either way call it before
        `optimizer.step()`.

        Non-finite losses are not pooled (with a warning); a refresh whose Fisher is not finite is
        skipped with a warning and keeps the current mask.
        """
        self.offer(losses, batch)
        self._steps += 1
        if not self._refresh_due(self._steps):
            return False
        return self.refresh_mask()

    def offer(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """Pool the samples of `batch` like `step` does, without counting a step.

        With gradient accumulation, call `step` on one micro-batch of each optimizer step (before
        its backward) and `offer` on the others, so that refreshes count optimizer steps.
        """
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            raise ValueError(
                f"losses must be a 1-D tensor with one loss per sample, got "
                f"{tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__}. "
                "Use fishdip_peft.forward_with_per_sample_losses to compute them."
            )
        size = batch_size_of(batch)
        if losses.numel() != size:
            raise ValueError(f"got {losses.numel()} losses for a batch of {size} samples; pass one loss per sample.")
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            warnings.warn(f"{int((~finite).sum())} non-finite per-sample losses; those samples are not pooled.")
        if bool(finite.any()):
            keep = torch.nonzero(finite).flatten()
            rows = keep if not bool(finite.all()) else None
            pooled_batch = batch if rows is None else _select_rows(batch, rows, size)
            self._pool.offer(losses.detach()[keep], pooled_batch)

    def set_rescoring(
        self,
        batches: Union[Iterable[Mapping[str, Any]], Callable[[], Iterable[Mapping[str, Any]]], None],
        losses_fn: Optional[Callable[[nn.Module, Any, Mapping[str, Any]], torch.Tensor]] = None,
    ) -> None:
        """Rank samples by re-scoring the training set at every refresh and for the first mask, as the
        authors' code does, instead of by the losses seen in training batches.

        `batches` is a re-iterable of training batches (e.g. a DataLoader without shuffling; with
        several processes, each process's own shard) or a callable returning one; `None` turns
        re-scoring off. `losses_fn(model, outputs, batch)` gives one loss per sample (default: the
        language-model or classification losses of `per_sample_losses_from_outputs`).
        """
        self._rescoring = None if batches is None else (batches, losses_fn or _default_losses)

    @torch.no_grad()
    def rescore(
        self,
        batches: Iterable[Mapping[str, Any]],
        losses_fn: Optional[Callable[[nn.Module, Any, Mapping[str, Any]], torch.Tensor]] = None,
    ) -> int:
        """Empty the pool and refill it with the samples of `batches`, scored with the current weights
        (eval mode, no gradient). Returns the number of samples scored."""
        losses_fn = losses_fn or _default_losses
        self._pool.clear()
        training = [(m, m.training) for m in self.model.modules()]
        scored = 0
        try:
            self.model.eval()
            for batch in batches:
                batch = distributed.to_device(dict(batch), self.fishdip_state.values.device)
                if "labels" not in batch:
                    raise ValueError("re-scoring needs `labels` in every batch of the training set.")
                losses = losses_fn(self.model, self.model(**batch), batch)
                self.offer(losses, batch)
                scored += losses.numel()
        finally:
            for module, was_training in training:
                module.training = was_training
        return scored

    def refresh_mask(self) -> bool:
        """Recompute the mask from the pooled samples now and empty the pool (re-scoring the training
        set first if `set_rescoring` was given one).

        With several processes (torch.distributed initialized), every process must call it: the
        Fisher is that of the top-n samples of all processes' pools and every process gets the same mask.
        """
        if self._rescoring is not None:
            self.rescore(self._rescoring[0]() if callable(self._rescoring[0]) else self._rescoring[0], self._rescoring[1])
        state = self.fishdip_state
        params = [slot.param for slot in state.slots]
        if distributed.is_multi_process():
            samples, total = distributed.my_share_of_pool(self._pool, state.values.device)
        else:
            samples = self._pool.drain()
            total = len(samples)
        if total == 0:
            warnings.warn("no finite-loss sample was pooled since the last refresh; the mask is kept.")
            return False
        scores = self._fisher_sum(samples, params)
        if distributed.is_multi_process():
            scores = distributed.sum_across_processes(scores, params)  # a failure anywhere becomes NaN
        if scores is None:
            return False
        if not all(bool(torch.isfinite(s).all()) for s in scores):
            warnings.warn("mask refresh skipped: the Fisher information is not finite.")
            return False
        for score in scores:
            score.div_(total)
        changed = state.set_selection(global_topk_indices(scores, state.k))
        self._refreshes += 1
        return changed

    def _fisher_sum(self, samples, params) -> Optional[list[torch.Tensor]]:
        """Σ (∇ℓ)² over `samples` (zeros if there are none), or None if a sample's loss is not finite."""
        if not getattr(self.model.config, "is_encoder_decoder", False):
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
        pass  # the trainable values are float32 whatever the weights' dtype

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("FishDipModel supports a single adapter.")

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; this model has {list(self.peft_config)}.")
        self.fishdip_state.values.requires_grad_(not inference_mode)

    def disable_adapter_layers(self) -> None:
        if self._adapters_disabled_stash is None:
            self._adapters_disabled_stash = self.fishdip_state.swap_base(None)
            self.fishdip_state._disable_adapters = True

    def enable_adapter_layers(self) -> None:
        if self._adapters_disabled_stash is not None:
            self.fishdip_state.swap_base(self._adapters_disabled_stash)
            self._adapters_disabled_stash = None
            self.fishdip_state._disable_adapters = False

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The base model with the trained values in its weights and no FISH-DIP state."""
        self.enable_adapter_layers()
        self.fishdip_state.write_back()
        return self._detach()

    def unload(self) -> nn.Module:
        """The base model with its original weights, bit for bit, and no FISH-DIP state."""
        self.enable_adapter_layers()
        self.fishdip_state.swap_base(None)
        return self._detach()

    def _detach(self) -> nn.Module:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name, param in self.model.named_parameters():
            param.requires_grad_(self._original_requires_grad.get(name, param.requires_grad))
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    def delete_adapter(self, adapter_name: str) -> None:
        raise NotImplementedError("FishDipModel holds one adapter; use unload() to remove it.")

    # -- checkpoint ----------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return checkpoint.sparse_delta_state_dict(distributed.fishdip_tuner(model).fishdip_state, config.delta_dtype)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        state = distributed.fishdip_tuner(model).fishdip_state
        checkpoint.validate_and_apply(state, state_dict)
        # The deltas are now in the weights. The trainable values belong to a mask the file does not
        # hold; passing them through unchanged keeps peft from reporting them as missing.
        values_key = next(n for n, p in model.named_parameters() if p is state.values)
        return {values_key: state.values.detach().clone()}

    # -- resumable training state --------------------------------------------------------------
    def training_state_dict(self) -> dict[str, Any]:
        """Everything beyond the weights that training needs to resume exactly: counters, pool, mask."""
        state = self.fishdip_state
        return {
            "steps": self._steps,
            "refreshes": self._refreshes,
            "pool": self._pool.state_dict(),
            "index": [slot.index.cpu() for slot in state.slots],
            "touched": [slot.touched.cpu() for slot in state.slots],
            "base": [slot.base.cpu() for slot in state.slots],
            "weights": [slot.flat[slot.touched].cpu() for slot in self._written_slots()],
            "values": state.values.detach().cpu().clone(),
            "names": [slot.name for slot in state.slots],
            "shapes": [tuple(slot.param.shape) for slot in state.slots],
        }

    def _written_slots(self):
        self.fishdip_state.write_back()
        self.fishdip_state.follow_devices()
        return self.fishdip_state.slots

    def load_training_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what `training_state_dict` returned, exactly: the weights at every entry ever trained,
        the trainable values, the mask, the pool and the step counters.

        The model must hold the same base weights (fresh, or trained from them: entries trained since
        are put back first). Every check runs before anything changes.
        """
        state = self.fishdip_state
        if self._adapters_disabled_stash is not None:
            raise RuntimeError("enable the adapter (leave disable_adapter()) before loading a training state.")
        names, shapes = [slot.name for slot in state.slots], [tuple(slot.param.shape) for slot in state.slots]
        if list(state_dict["names"]) != names or [tuple(s) for s in state_dict["shapes"]] != shapes:
            raise ValueError("the training state is for other eligible weights (another model or target_modules).")
        if state_dict["values"].numel() != state.k:
            raise ValueError(
                f"the training state has {state_dict['values'].numel()} trainable values; this model has K={state.k}."
            )
        for slot, touched, base in zip(self._written_slots(), state_dict["touched"], state_dict["base"]):
            if base.dtype != slot.param.dtype:
                raise ValueError(
                    f"'{slot.name}' is {slot.param.dtype} here but was {base.dtype} in training; load the same dtype."
                )
            if not torch.equal(_base_values_at(slot, touched.to(slot.param.device)).cpu(), base):
                raise ValueError(
                    f"the base values of '{slot.name}' differ from those the training state was made from: this "
                    "is not the same base model. Nothing was changed."
                )
        state.restore(
            state_dict["index"], state_dict["touched"], state_dict["base"], state_dict["weights"], state_dict["values"]
        )
        self._pool.load_state_dict(distributed.to_device(state_dict["pool"], state.values.device))
        self._steps, self._refreshes = int(state_dict["steps"]), int(state_dict["refreshes"])


def _base_values_at(slot, positions: torch.Tensor) -> torch.Tensor:
    """The base (pre-training) values of `slot`'s weight at `positions`."""
    values = slot.flat[positions].clone()
    if slot.touched.numel() and positions.numel():
        found = torch.searchsorted(slot.touched, positions).clamp(max=slot.touched.numel() - 1)
        hit = slot.touched[found] == positions
        values[hit] = slot.base[found[hit]]
    return values


def _default_losses(model: nn.Module, outputs, batch: Mapping[str, Any]) -> torch.Tensor:
    return per_sample_losses_from_outputs(model, outputs, batch["labels"])


def _select_rows(batch: Mapping[str, Any], rows: torch.Tensor, size: int) -> dict[str, Any]:
    return {
        k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == size else v
        for k, v in batch.items()
    }


"""How an adapter trains: automatic mode, `step()`, the pool and the mask refresh.

`SteppingMixin` is the half of `FishDipModel` that follows training. Training forward passes that
carry `labels` pool their samples with their per-sample losses (automatic mode); an optimizer hook
counts optimizer steps; at the first training forward after every `update_every`-th optimizer step
(never inside a gradient accumulation) the mask is recomputed from the empirical Fisher of the pooled
samples. A loop may call `step()` instead, with its own per-sample losses.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from . import distributed
from .fisher import empirical_fisher, eval_mode, trim_right_padding
from .losses import IGNORE_INDEX
from .pool import batch_size_of
from .progress import AdapterProgress
from .selection import global_topk_indices
from .sparse import SparseAdapter


class SteppingMixin:
    """Automatic mode, `step`, `offer`, re-scoring and `refresh_mask` (mixed into `FishDipModel`)."""

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
        active = [n for n in self.active_adapters if n in self.sparse_adapters]
        if len(active) > 1 and any(self.sparse_adapters[n].holds_values(optimizer) for n in active):
            raise RuntimeError(
                f"several FISH-DIP adapters are active ({active}): their deltas are summed for inference and "
                "merging, but FISH-DIP trains one adapter at a time. Call set_adapter(name) before training."
            )
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
        if distributed.is_multi_process() and not self.prepared_for_processes:  # averaged by DDP: check it
            for name, adapter in self.sparse_adapters.items():
                values = adapter.values
                if not (values.requires_grad and adapter.holds_values(optimizer)):
                    continue
                if not distributed.same_in_every_process(values.grad, values.device):
                    raise RuntimeError(
                        f"the gradient of FISH-DIP adapter '{name}' differs between processes, so their weights "
                        "would drift apart. DistributedDataParallel averages it when autograd runs the values' "
                        "gradient accumulator, which must happen once per backward, after every tap: reentrant "
                        "gradient checkpointing runs it once per checkpointed segment (use "
                        "gradient_checkpointing_kwargs={'use_reentrant': False}), and DDP must not ignore the "
                        "values. FishDipTrainer averages the gradient itself in every case."
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
        labels = batch["labels"]
        self._check_labels(labels)
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and not labels.is_floating_point():
            # a sample without any target token has no loss to rank by and no gradient for the Fisher
            finite &= (labels != IGNORE_INDEX).flatten(1).any(1).to(finite.device)
        if bool(finite.any()):
            keep = torch.nonzero(finite).flatten()
            pooled = batch if bool(finite.all()) else _select_rows(batch, keep, size)
            self.progress[self._single_active()].pool.offer(losses.detach()[keep], pooled)

    def _check_labels(self, labels) -> None:
        """Token labels must be integer ids of the vocabulary or the ignore index: a bad label would only
        surface at the next refresh, steps later."""
        if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
            return  # classification or regression targets: the model's own loss checks them
        if labels.is_floating_point():
            raise ValueError(f"token labels must be integer ids, got {labels.dtype}; pass labels.long().")
        counted = labels[labels != IGNORE_INDEX]
        if counted.numel() == 0:
            return
        low, high = (int(v) for v in torch.aminmax(counted))
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if low < 0 or (vocab is not None and high >= vocab):
            raise ValueError(f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX} (not a target); got values "
                             f"from {low} to {high}.")

    def _check_processes(self) -> None:
        """With several processes, the values' gradient must be averaged: by DistributedDataParallel (the
        plain Trainer, accelerate's `prepare`), or by FishDipTrainer / `prepare_with_accelerator`."""
        if not distributed.is_multi_process() or self.prepared_for_processes or distributed.trains_in_ddp(self):
            return
        raise RuntimeError(
            "FISH-DIP in several processes needs its values' gradient averaged: train the model wrapped in "
            "DistributedDataParallel (as transformers' Trainer, TRL's SFTTrainer and accelerate's prepare do) or "
            "through FishDipTrainer or fishdip_peft.prepare_with_accelerator(accelerator, model, optimizer, ...). "
            "This training forward runs outside DDP: wrap the model, or use FishDipTrainer in place of Trainer."
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
        scored = 0
        with eval_mode(self.model):
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
            config = self.peft_config[self._single_active()]
            autocast_dtype = None if config.fisher_dtype == "float32" else getattr(torch, config.fisher_dtype)
            return empirical_fisher(self.model, samples, params, mean=False, autocast_dtype=autocast_dtype,
                                    batch_size=config.fisher_batch_size)
        except FloatingPointError as error:
            warnings.warn(f"mask refresh skipped: {error}")
            return None
        finally:
            self._computing_fisher = False


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

"""FISH-DIP with accelerate and several processes: preparing the model, syncing gradients.

A model prepared here is not wrapped in DDP (its values get their gradient outside autograd, from the
taps): accelerate places it and applies mixed precision, process 0's state is broadcast, and the values'
gradient is averaged before each optimizer step (`sync_gradients`, also run by an optimizer pre-hook
that `register_optimizer` installs), after the whole backward. A model wrapped in DDP instead (the plain
Trainer) has the gradient averaged by DDP's reducer (see `distributed.py`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import distributed
from .lookup import fishdip_tuner, is_fishdip_model

_synced_at: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_hooked_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def sync_gradients(model: nn.Module) -> None:
    """Average the gradient of the active adapter's values over all processes; a no-op in one process.

    Call it after the last backward of an optimizer step and before gradient clipping (FishDipTrainer
    and `register_optimizer`'s hook do). Calling it again before another backward pass does nothing.
    """
    if not distributed.is_multi_process():
        return
    adapter = fishdip_tuner(model).fishdip_state
    if _synced_at.get(adapter) == adapter.grad_writes:
        return
    distributed.average_gradient(adapter.values)
    _synced_at[adapter] = adapter.grad_writes


def register_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Let `model` remap `optimizer`'s state at mask refreshes from the start (not only after its first
    step), and, with several processes, average the values' gradient before each of its steps unless
    `sync_gradients` already did. `optimizer` may be wrapped by accelerate."""
    tuner = fishdip_tuner(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    adapter = tuner.fishdip_state
    if not adapter.holds_values(inner):
        raise ValueError("the optimizer does not hold the FISH-DIP values; build it from model.parameters().")
    adapter.register_optimizer(inner)
    if distributed.is_multi_process() and inner not in _hooked_optimizers:
        tuner_ref = weakref.ref(tuner)

        def average_gradients(opt, args, kwargs):
            target = tuner_ref()
            if target is not None:
                sync_gradients(target)

        inner.register_step_pre_hook(average_gradients)
        _hooked_optimizers.add(inner)


@torch.no_grad()
def sync_initial_state(model: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process; in a fresh run it also gives each
    process its own stream for the uniform pool."""
    if not distributed.is_multi_process():
        return
    tuner = fishdip_tuner(model)
    tuner.prepared_for_processes = True
    distributed.broadcast_parameters_and_buffers(model)
    for adapter in tuner.sparse_adapters.values():
        adapter.write_back(force=True)
    distributed.seed_uniform_pools(tuner)


def check_accelerator(accelerator) -> None:
    """Raise a clear error for the parallel modes FISH-DIP does not support (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise NotImplementedError(
            "FISH-DIP does not support FSDP: sharding flattens and moves the weights that FISH-DIP trains "
            "in place, and the trainable values get their gradient outside autograd. Use data parallelism "
            "(`accelerate launch --multi_gpu` or torchrun): every process holds the model, and the FISH-DIP "
            "optimizer state is only O(K)."
        )
    if kind == DistributedType.DEEPSPEED:
        raise NotImplementedError(
            "FISH-DIP does not support DeepSpeed: its engine owns the gradients and the optimizer step and "
            "never sees the FISH-DIP values' gradient, which is filled outside autograd. Use data parallelism "
            "(`accelerate launch --multi_gpu` or torchrun) without a DeepSpeed config."
        )
    if kind == DistributedType.MEGATRON_LM:
        raise NotImplementedError("FISH-DIP does not support Megatron-LM; use data parallelism.")


def keep_fishdip_models_unwrapped(accelerator) -> None:
    """Make `accelerator.prepare` place a FISH-DIP model on its device and apply mixed precision
    without wrapping it in DDP, and broadcast process 0's state to the others (see module doc)."""
    if getattr(accelerator, "_fishdip_prepare_model", None) is not None:
        return
    original = accelerator.prepare_model

    def prepare_model(model, device_placement=None, evaluation_mode=False):
        if not is_fishdip_model(model):
            return original(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        check_accelerator(accelerator)
        model = original(model, device_placement=device_placement, evaluation_mode=True)
        if not evaluation_mode:
            sync_initial_state(model)
        return model

    accelerator.prepare_model = prepare_model
    accelerator._fishdip_prepare_model = prepare_model


def prepare_with_accelerator(accelerator, model: nn.Module, *objects):
    """`accelerator.prepare(model, *objects)` for a FISH-DIP model in a custom training loop.

    The model is placed on the device with mixed precision applied but not wrapped in DDP; process
    0's state is broadcast; optimizers among `objects` are registered (see `register_optimizer`).
    Returns the prepared `(model, *objects)`.
    """
    check_accelerator(accelerator)
    keep_fishdip_models_unwrapped(accelerator)
    model = accelerator.prepare_model(model)
    prepared = ()
    if objects:
        prepared = accelerator.prepare(*objects)
        prepared = tuple(prepared) if len(objects) > 1 else (prepared,)
    for obj in prepared:
        if isinstance(getattr(obj, "optimizer", obj), torch.optim.Optimizer):
            register_optimizer(model, obj)
    return (model, *prepared)

"""Data-parallel FISH-DIP: every process holds the whole model and keeps the same mask and weights.

The trainable `values` get their gradient by side effect (see `sparse.GradientTap`), outside
autograd, so `DistributedDataParallel` would never see it. A FISH-DIP model is therefore not wrapped
in DDP; instead:
- `sync_gradients` averages `values.grad` over the processes (one all-reduce of K + 1 floats),
  before gradient clipping and the optimizer step, which is what DDP would have done;
- a mask refresh ranks the weights by the Fisher of the global top-n samples: every process keeps
  its own pool, the pools' keys are gathered (`my_share_of_pool`), each process computes the Fisher
  of its own share of the global top-n and the scores are summed by an all-reduce
  (`sum_across_processes`), so every process gets the same scores bit for bit and the same entries;
- `sync_initial_state` broadcasts the parameters and buffers of process 0, as DDP does.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn


_synced_at: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_hooked_optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_multi_process() -> bool:
    return world_size() > 1


def fishdip_tuner(model: nn.Module):
    """The `FishDipModel` inside `model` (a PeftModel, possibly wrapped by DDP or torch.compile)."""
    from .model import FishDipModel

    seen = model
    for _ in range(4):
        if isinstance(seen, FishDipModel):
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


# -- gradients -------------------------------------------------------------------------------------
@torch.no_grad()
def sync_gradients(model: nn.Module) -> None:
    """Average the gradient of the trainable values over all processes; a no-op in one process.

    Call it after the last backward of an optimizer step and before gradient clipping. A process
    without a gradient counts as a zero gradient, as in DDP; if no process has one, `grad` stays None.
    Calling it again before another backward pass does nothing.
    """
    if not is_multi_process():
        return
    state = fishdip_tuner(model).fishdip_state
    values, grad = state.values, state.values.grad
    if _synced_at.get(state) == state.grad_writes:
        return
    buffer = torch.zeros(values.numel() + 1, dtype=torch.float32, device=values.device)
    if grad is not None:
        buffer[:-1] = grad.reshape(-1)
        buffer[-1] = 1.0
    dist.all_reduce(buffer)
    _synced_at[state] = state.grad_writes
    if float(buffer[-1]) != 0.0:
        values.grad = buffer[:-1].div_(world_size()).view_as(values).to(values.dtype).clone()


def register_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Let `model` remap `optimizer`'s state at mask refreshes from the start (not only after its
    first step), and, with several processes, average the values' gradient before each of its steps
    unless `sync_gradients` already did. `optimizer` may be wrapped by accelerate."""
    tuner = fishdip_tuner(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = tuner.fishdip_state
    if not any(p is state.values for group in inner.param_groups for p in group["params"]):
        raise ValueError("the optimizer does not hold the FISH-DIP values; build it from model.parameters().")
    if not any(ref() is inner for ref in state.optimizers):
        state.optimizers.append(weakref.ref(inner))
    if is_multi_process() and inner not in _hooked_optimizers:
        tuner_ref = weakref.ref(tuner)

        def average_gradients(opt, args, kwargs):
            target = tuner_ref()
            if target is not None:
                sync_gradients(target)

        inner.register_step_pre_hook(average_gradients)
        _hooked_optimizers.add(inner)


# -- initial state -----------------------------------------------------------------------------------
@torch.no_grad()
def sync_initial_state(model: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process (what DDP does when it wraps a
    model); in a fresh run it also gives each process its own stream for the uniform pool."""
    if not is_multi_process():
        return
    tuner = fishdip_tuner(model)
    for tensor in [*model.parameters(), *model.buffers()]:
        _broadcast_in_place(tensor.data)
    tuner.fishdip_state.write_back(force=True)
    config = tuner.peft_config[tuner.active_adapter]
    if not config.sample_aware and tuner._steps == 0 and len(tuner._pool) == 0:
        tuner._pool.reseed(config.seed + rank())


def _broadcast_in_place(tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        return
    flat = tensor.reshape(-1) if tensor.is_contiguous() else tensor.contiguous().reshape(-1)
    dist.broadcast(flat.view(torch.uint8), src=0)
    if flat.data_ptr() != tensor.data_ptr():
        tensor.copy_(flat.view_as(tensor))


# -- mask refresh ------------------------------------------------------------------------------------
def my_share_of_pool(pool, device) -> tuple[list[dict[str, Any]], int]:
    """Drain `pool` and return this process's samples among the global top-n of all processes' pools,
    with the number of samples in that global top. Ties go to the earlier arrival, then the lower rank."""
    capacity, keys = pool.capacity, pool.keys()
    table = torch.full((capacity, 2), float("nan"), dtype=torch.float64, device=device)
    if keys:
        table[: len(keys)] = torch.tensor(keys, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(table) for _ in range(world_size())]
    dist.all_gather(gathered, table)
    candidates = []
    for source, rows in enumerate(gathered):
        for position, (key, arrival) in enumerate(rows.cpu().tolist()):
            if key == key:  # not NaN: a pooled sample
                candidates.append((key, arrival, -source, position))
    top = sorted(candidates, reverse=True)[:capacity]
    samples = pool.drain()
    mine = sorted(position for _, _, source, position in top if -source == rank())
    return [samples[i] for i in mine], len(top)


def sum_across_processes(scores: Optional[list[torch.Tensor]], params: Sequence[nn.Parameter]):
    """All-reduce (sum) per-process Fisher sums. `None` stands for a failed Fisher on this process; it
    is sent as NaN, so that every process sees non-finite scores and skips the refresh together."""
    if scores is None:
        scores = [torch.full(p.shape, float("nan"), dtype=torch.float32, device=p.device) for p in params]
    for score in scores:
        dist.all_reduce(score)
    return scores


# -- pool state across processes --------------------------------------------------------------------
def gather_pool_states(tuner) -> list[dict[str, Any]]:
    """Every process's pool state (tensors on the CPU), in rank order."""
    local = _to_cpu(tuner._pool.state_dict())
    if not is_multi_process():
        return [local]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, local)
    return everyone


def pool_state_for_this_process(states: list[dict[str, Any]], capacity: int) -> dict[str, Any]:
    """This process's pool from the saved pools of all processes. With another number of processes
    than was saved, process 0 takes the best `capacity` samples of all the saved pools (the global
    top-n is unchanged) and the others start empty."""
    if len(states) == world_size():
        return states[rank()]
    if rank() != 0:
        return {"entries": [], "seen": 0, "rng": states[0]["rng"]}
    return merge_pool_states(states, capacity)


def merge_pool_states(states: list[dict[str, Any]], capacity: int) -> dict[str, Any]:
    """One pool state holding the `capacity` best samples of `states` (ties as across processes)."""
    tagged = [
        (key, neg_arrival, -source, sample)
        for source, state in enumerate(states)
        for key, neg_arrival, sample in state["entries"]
    ]
    best = sorted(tagged, key=lambda e: e[:3], reverse=True)[:capacity]
    by_arrival = sorted(best, key=lambda e: (-e[1], -e[2]))
    entries = [(key, -(i + 1), sample) for i, (key, _, _, sample) in enumerate(by_arrival)]
    seen = max(sum(s["seen"] for s in states), len(entries))
    return {"entries": entries, "seen": seen, "rng": states[0]["rng"]}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# -- accelerate --------------------------------------------------------------------------------------
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

"""The collectives of data-parallel FISH-DIP: every process holds the whole model and the same mask.

- `average_gradient` averages the values' gradient over the processes (one all-reduce of K + 1 floats)
  for a model that FishDipTrainer or `prepare_with_accelerator` keep unwrapped (see `integrations.py`);
- a model trained inside DistributedDataParallel (the plain Trainer) needs none: DDP's reducer averages a
  parameter's `.grad` when autograd runs its gradient accumulator, and the values' accumulator runs once
  per backward, after every tap has added its part (`trains_in_ddp`); `same_in_every_process` checks
  that the averaged gradient agrees before each optimizer step;
- a mask refresh ranks the weights by the Fisher of the global top-n samples: every process keeps
  its own pool, the pools' keys are gathered (`my_share_of_pool`), each process computes the Fisher
  of its own share of the global top-n and the scores are summed by an all-reduce
  (`sum_across_processes`), so every process gets the same scores bit for bit and the same entries;
- `broadcast_parameters_and_buffers` copies process 0's model to the others, as DDP does.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .lookup import fishdip_tuner

_in_ddp: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # tuners whose training forwards DDP runs
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_multi_process() -> bool:
    return world_size() > 1


# -- gradients -------------------------------------------------------------------------------------
@torch.no_grad()
def average_gradient(values: torch.Tensor) -> None:
    """Average `values.grad` over all processes (one all-reduce of K + 1 floats); a no-op in one process.

    A process without a gradient counts as a zero gradient, as in DDP; if no process has one, `grad`
    stays None.
    """
    if not is_multi_process():
        return
    buffer = torch.zeros(values.numel() + 1, dtype=torch.float32, device=values.device)
    if values.grad is not None:
        buffer[:-1] = values.grad.reshape(-1)
        buffer[-1] = 1.0
    dist.all_reduce(buffer)
    if float(buffer[-1]) != 0.0:
        values.grad = buffer[:-1].div_(world_size()).view_as(values).to(values.dtype).clone()


@torch.no_grad()
def same_in_every_process(tensor: Optional[torch.Tensor], device) -> bool:
    """Whether `tensor` (or None everywhere) holds the same bits in every process: two checksums of its
    bits, compared by one all-reduce of 6 integers."""
    sums = torch.zeros(3, dtype=torch.int64, device=device)
    if tensor is not None:
        flat = tensor.detach().contiguous().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]).long()
        weights = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=bits.device)
        sums[0], sums[1], sums[2] = 1, bits.sum(), (bits * weights).sum()  # integer sums wrap, exactly
    both = torch.cat([sums, -sums])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(torch.equal(both[:3], -both[3:]))


# -- training inside DistributedDataParallel ---------------------------------------------------------
def trains_in_ddp(tuner: nn.Module) -> bool:
    """Whether `tuner`'s training forwards run inside a DistributedDataParallel that wraps it: True from
    the first one that does, which also gives each process its own uniform-pool stream."""
    if tuner in _in_ddp:
        return True
    ddp = nn.parallel.DistributedDataParallel._get_active_ddp_module()  # the DDP whose forward runs now
    try:
        wrapped = ddp is not None and fishdip_tuner(ddp.module) is tuner
    except TypeError:
        wrapped = False
    if wrapped:
        _in_ddp.add(tuner)
        seed_uniform_pools(tuner)
    return wrapped


def seed_uniform_pools(tuner) -> None:
    """In a fresh run, give each process its own stream for the uniform pool (seed + rank)."""
    for name in tuner.sparse_adapters:
        config, progress = tuner.peft_config[name], tuner.progress[name]
        if not config.sample_aware and progress.optimizer_steps == 0 and len(progress.pool) == 0:
            progress.pool.reseed(config.seed + rank())


# -- initial state -----------------------------------------------------------------------------------
@torch.no_grad()
def broadcast_parameters_and_buffers(model: nn.Module) -> None:
    """Copy process 0's parameters and buffers to every process (what DDP does when it wraps a model)."""
    if not is_multi_process():
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        _broadcast_in_place(tensor.data)


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
def gather_pool_states(pool) -> list[dict[str, Any]]:
    """Every process's pool state (tensors on the CPU), in rank order."""
    local = _to_cpu(pool.state_dict())
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



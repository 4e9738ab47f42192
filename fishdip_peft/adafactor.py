"""Adafactor for FISH-DIP: `transformers.Adafactor` per weight tensor, from the K trainable values.

The FISH-DIP authors train with `transformers.Adafactor` on the dense weights and zero the gradients
of the unselected entries before each step. `SparseAdafactor` gives the same updates from the compact
trainable values alone: for every eligible weight tensor it keeps Adafactor's factored second moments
(one entry per row and per column, built from the selected entries' squared gradients, zeros elsewhere),
scales the step by the tensor's parameter RMS and clips the update by the tensor's update RMS. Its
state is O(Σ (rows + cols)) for weights of two or more dimensions and O(numel) for vectors (biases,
norms): nothing is per selected entry, so a mask refresh leaves it as it is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .lookup import fishdip_tuner


class SparseAdafactor(torch.optim.Optimizer):
    """`transformers.Adafactor` (same arguments and defaults) for the trainable values of a FISH-DIP model.

    Build it from the model instead of its parameters: `SparseAdafactor(peft_model, lr=1e-2,
    scale_parameter=True, relative_step=False, warmup_init=False)` is the FISH-DIP authors' optimizer.
    Each step equals `transformers.Adafactor` run on every eligible weight with its gradient zeroed
    outside the mask. Not supported: `beta1` (a dense first moment would move frozen entries).
    `weight_decay` decays the trainable entries only.
    """

    # The state is per weight tensor, not per trainable entry: mask refreshes must not remap it.
    fishdip_state_is_per_entry = False

    def __init__(
        self,
        model: nn.Module,
        lr: Optional[float] = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: Optional[float] = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ):
        if lr is not None and relative_step:
            raise ValueError("cannot combine a manual `lr` with relative_step=True; pass relative_step=False.")
        if warmup_init and not relative_step:
            raise ValueError("warmup_init=True requires relative_step=True.")
        if beta1 is not None:
            raise ValueError(
                "SparseAdafactor does not support beta1: Adafactor's first moment is dense and would keep moving "
                "entries after they leave the mask. Use beta1=None (the default), or AdamW for momentum."
            )
        self.fishdip_state = fishdip_tuner(model).fishdip_state
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate, beta1=None,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__([self.fishdip_state.values], defaults)
        self._layout = _StateLayout(self.fishdip_state.slots)

    @staticmethod
    def _rms(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.norm(2) / (tensor.numel() ** 0.5)

    @staticmethod
    def _lr(group: dict, step: int, rms: torch.Tensor):
        """`transformers.Adafactor._get_lr`."""
        rel_step_sz = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rel_step_sz = min(min_step, 1.0 / math.sqrt(step))
        param_scale = max(group["eps"][1], rms) if group["scale_parameter"] else 1.0
        return param_scale * rel_step_sz

    def _init_state(self, values: torch.Tensor) -> dict:
        state = self.state[values]
        if not state:
            state["step"] = 0
            state["exp_avg_sq_row"] = torch.zeros(self._layout.rows, dtype=torch.float32, device=values.device)
            state["exp_avg_sq_col"] = torch.zeros(self._layout.cols, dtype=torch.float32, device=values.device)
            state["exp_avg_sq"] = torch.zeros(self._layout.vectors, dtype=torch.float32, device=values.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        values = group["params"][0]
        if values.grad is None:
            return loss
        self.fishdip_state.write_back()  # the weights hold the current values: their RMS scales the step
        state = self._init_state(values)
        state["step"] += 1
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        eps0 = group["eps"][0]
        grad = values.grad.float()
        for slot, where in zip(self.fishdip_state.slots, self._layout.places):
            segment = slot.value_range()
            positions = slot.index.to(grad.device)
            g = grad[segment]
            weight = slot.param.detach().float()
            lr = self._lr(group, state["step"], self._rms(weight))
            if where.factored:
                update = self._factored_update(state, where, g, positions, beta2t, eps0)
            else:
                exp_avg_sq = state["exp_avg_sq"][where.vector]
                squared = torch.full_like(exp_avg_sq, eps0)
                squared[positions] = g * g + eps0
                exp_avg_sq.mul_(beta2t).add_(squared, alpha=1.0 - beta2t)
                update = exp_avg_sq[positions].rsqrt().mul_(g)
            rms = update.norm(2) / (slot.numel**0.5)  # the dense update is zero outside the mask
            update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
            update.mul_(lr)
            target = values[segment]
            if group["weight_decay"] != 0:
                target.add_(target, alpha=-group["weight_decay"] * lr)
            target.add_(-update.to(values.dtype))
        return loss

    @staticmethod
    def _factored_update(state, where, g, positions, beta2t, eps0):
        rows_per_block, cols = where.shape_rc
        exp_avg_sq_row = state["exp_avg_sq_row"][where.row]
        exp_avg_sq_col = state["exp_avg_sq_col"][where.col]
        row_of = positions // cols
        col_of = (positions // (rows_per_block * cols)) * cols + positions % cols
        squared = g * g
        row_mean = torch.zeros_like(exp_avg_sq_row).index_add_(0, row_of, squared).div_(cols).add_(eps0)
        col_mean = torch.zeros_like(exp_avg_sq_col).index_add_(0, col_of, squared).div_(rows_per_block).add_(eps0)
        exp_avg_sq_row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
        exp_avg_sq_col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)
        blocks = exp_avg_sq_row.view(-1, rows_per_block)
        r_factor = (blocks / blocks.mean(dim=-1, keepdim=True)).rsqrt_().view(-1)
        c_factor = exp_avg_sq_col.rsqrt()
        return (r_factor[row_of] * c_factor[col_of]).mul_(g)


class _Place:
    """Where one weight tensor's Adafactor state lives in the flat state buffers."""

    def __init__(self, shape: torch.Size, row: int, col: int, vector: int):
        self.factored = len(shape) >= 2
        if self.factored:
            rows_per_block, cols = shape[-2], shape[-1]
            blocks = math.prod(shape[:-2])
            self.shape_rc = (rows_per_block, cols)
            self.row = slice(row, row + blocks * rows_per_block)
            self.col = slice(col, col + blocks * cols)
            self.vector = slice(vector, vector)
        else:
            self.row, self.col = slice(row, row), slice(col, col)
            self.vector = slice(vector, vector + math.prod(shape))


class _StateLayout:
    """Offsets of every weight tensor's row, column and vector statistics in the flat buffers."""

    def __init__(self, slots):
        self.places: list[_Place] = []
        row = col = vector = 0
        for slot in slots:
            place = _Place(slot.param.shape, row, col, vector)
            self.places.append(place)
            row, col, vector = place.row.stop, place.col.stop, place.vector.stop
        self.rows, self.cols, self.vectors = row, col, vector

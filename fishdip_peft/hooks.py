"""Gradient taps: how the trainable values get their gradient while the weights stay frozen.

While the active adapter trains, every module that owns an eligible weight is tapped:

* `nn.Linear`, `nn.Embedding` and transformers' `Conv1D`: a forward hook passes the output through
  `taps.tap_output`, whose backward computes the gradient of the trainable entries only (a sampled
  product of the output gradient and the saved input: K·T multiply-adds instead of the dense
  out·in·T) and adds it to `values.grad`. The frozen weight gets no gradient at all.
* any other module (norms, custom layers): a forward pre-hook swaps the weight for `DenseTap(weight)`,
  an identity whose backward picks the trainable entries of the dense weight gradient.

The trainable positions are read when the backward runs, so a mask refreshed between the forward and
the backward applies to that step's update. Which modules are tapped does not depend on the mask, so
a forward recomputed by gradient checkpointing builds the same graph.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import nn

from .taps import selected_bias_grad, selected_embedding_grad, selected_linear_grad, split_positions, tap_output


class DenseTap(torch.autograd.Function):
    """Identity on a frozen weight; its backward hands the gradient's trainable entries to the adapter."""

    @staticmethod
    def forward(ctx, weight, values, adapter, slot):
        ctx.adapter, ctx.slot = adapter, slot
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad_weight):
        slot = ctx.slot
        if slot.num_selected:
            ctx.adapter.accumulate(slot, grad_weight.reshape(-1).index_select(0, slot.index.to(grad_weight.device)))
        return None, None, None, None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _selected_grad_sink(module: nn.Module, adapter, weight_slot, bias_slot):
    """The backward of a tapped Linear / Embedding / Conv1D output: the trainable entries' gradients."""

    def sink(delta, inputs):
        x = inputs[0]
        if weight_slot is not None and weight_slot.num_selected:
            rows, cols = split_positions(weight_slot.index.to(delta.device), weight_slot.param.shape)
            if isinstance(module, nn.Embedding):
                grad = selected_embedding_grad(x, delta, rows, cols, module.num_embeddings, module.padding_idx,
                                               module.scale_grad_by_freq)
            else:
                grad = selected_linear_grad(x, delta, rows, cols, transposed=_is_conv1d(module))
            adapter.accumulate(weight_slot, grad)
        if bias_slot is not None and bias_slot.num_selected:
            adapter.accumulate(bias_slot, selected_bias_grad(delta, bias_slot.index.to(delta.device)))

    return sink


class TapSet:
    """The taps of one model. `target()` returns the `SparseAdapter` that trains now, or None; it is
    read at every tapped module's forward."""

    def __init__(self, target: Callable[[], Optional[object]]):
        self._target = target
        self._covered: set[int] = set()
        self._handles: list = []

    def cover(self, model: nn.Module, params: list[nn.Parameter]) -> None:
        """Tap the modules that own any of `params` (parameters already covered are left as they are)."""
        wanted = {id(p) for p in params} - self._covered
        if not wanted:
            return
        for module in model.modules():
            owned = [(attr, p) for attr, p in module._parameters.items() if p is not None and id(p) in wanted]
            if not owned:
                continue
            kernel = isinstance(module, (nn.Linear, nn.Embedding)) or _is_conv1d(module)
            if kernel and {attr for attr, _ in owned} <= {"weight", "bias"}:
                self._handles.append(module.register_forward_hook(self._output_hook(dict(owned))))
            else:
                self._handles.append(module.register_forward_pre_hook(self._swap_hook(owned)))
                self._handles.append(module.register_forward_hook(_unswap_hook(owned), always_call=True))
        self._covered |= wanted

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._covered = [], set()

    def _current(self):
        return self._target()

    def _output_hook(self, owned: dict):
        taps = weakref.ref(self)

        @torch.compiler.disable
        def tap(module, args, output):
            this = taps()
            adapter = this._current() if this is not None else None
            if adapter is None:
                return None
            weight_slot = adapter.slot_for(owned["weight"]) if "weight" in owned else None
            bias_slot = adapter.slot_for(owned["bias"]) if "bias" in owned else None
            if weight_slot is None and bias_slot is None:
                return None
            sink = _selected_grad_sink(module, adapter, weight_slot, bias_slot)
            return tap_output(output, args[:1], adapter.values, sink)

        return tap

    def _swap_hook(self, owned):
        taps = weakref.ref(self)

        @torch.compiler.disable
        def swap(module, args):
            this = taps()
            adapter = this._current() if this is not None else None
            if adapter is None:
                return
            for attr, param in owned:
                slot = adapter.slot_for(param)
                if slot is not None:
                    module._parameters[attr] = DenseTap.apply(param, adapter.values, adapter, slot)

        return swap


def _unswap_hook(owned):
    @torch.compiler.disable
    def unswap(module, args, output):
        for attr, param in owned:
            module._parameters[attr] = param

    return unswap

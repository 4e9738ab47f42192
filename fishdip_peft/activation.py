"""Which adapters the weights hold: activating, disabling, merging, and several active adapters at once.

One active adapter is *in the weights* (`SparseAdapter.in_weights`): the weights hold its trained
values, and it can train. Several active adapters (`set_adapter([...])`, peft's way to combine them) are
for inference and merging: every adapter is out of the weights and the active ones' deltas (trained −
base) are added to the base values, the *overlay*; writing the base values back undoes it exactly.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

from peft.tuners.tuners_utils import set_adapter as set_peft_adapter
from peft.tuners.tuners_utils import set_requires_grad as set_peft_requires_grad
from torch import nn

from .layer import FishDipLayer


class ActivationMixin:
    """`set_adapter`, enable / disable, merge / unmerge / unload (mixed into `FishDipModel`)."""

    # -- the weights' content -------------------------------------------------------------------
    def _activate(self, adapter_name: str, trainable: bool) -> None:
        self._clear_overlay()
        for name, other in self.sparse_adapters.items():
            if name != adapter_name:
                other.remove_from_weights()
                other.values.requires_grad_(False)
        adapter = self.sparse_adapters[adapter_name]
        if not self._disabled:
            adapter.put_into_weights()
        adapter.values.requires_grad_(trainable)

    def _apply_overlay(self, names: list[str]) -> None:
        """The weights hold the base values plus the deltas of every adapter in `names`."""
        self._clear_overlay()
        for adapter in self.sparse_adapters.values():
            adapter.remove_from_weights()
        for name in names:
            self.sparse_adapters[name].add_delta_to_weights()
        self._overlay = list(names)

    def _clear_overlay(self) -> None:
        for name in self._overlay:
            self.sparse_adapters[name].restore_base()
        self._overlay = []

    @contextmanager
    def _weights_of(self, adapter_name: str):
        """Within it, the weights hold `adapter_name`'s values (and no other adapter's)."""
        overlay = list(self._overlay)
        self._clear_overlay()
        was = {name: adapter.in_weights for name, adapter in self.sparse_adapters.items()}
        for name, adapter in self.sparse_adapters.items():
            if name != adapter_name:
                adapter.remove_from_weights()
        self.sparse_adapters[adapter_name].put_into_weights()
        try:
            yield
        finally:
            for name, adapter in self.sparse_adapters.items():
                if not was.get(name, False):
                    adapter.remove_from_weights()
            for name, adapter in self.sparse_adapters.items():
                if was.get(name, False):
                    adapter.put_into_weights()
            if overlay:
                self._apply_overlay([n for n in overlay if n in self.sparse_adapters])

    # -- peft API -------------------------------------------------------------------------------
    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter, or, given several names, apply all of them at once (their
        deltas summed; for inference and merging: FISH-DIP trains one adapter at a time)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.sparse_adapters]
        if not names or unknown:
            raise ValueError(f"unknown adapter(s) {unknown or names}; this model has {list(self.sparse_adapters)}.")
        # peft's modules_to_save copies first: it refuses several adapters that save the same module
        set_peft_adapter(self.model, names if len(names) > 1 else names[0], inference_mode, layer_cls=FishDipLayer)
        self.active_adapter = self.fishdip_layer._active_adapter = names[0] if len(names) == 1 else names
        if len(names) == 1:
            self._activate(names[0], trainable=not inference_mode)
            return
        for adapter in self.sparse_adapters.values():
            adapter.values.requires_grad_(False)
        if self._disabled:
            self._clear_overlay()
        else:
            self._apply_overlay(names)

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Enable or disable gradients on the values (and modules_to_save copies) of `adapter_names`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.sparse_adapters[name].values.requires_grad_(requires_grad)
        set_peft_requires_grad(self.model, adapter_names=names, requires_grad=requires_grad)

    def _active_fishdip(self) -> list[str]:
        return [n for n in self.active_adapters if n in self.sparse_adapters]

    def disable_adapter_layers(self) -> None:
        if not self._disabled:
            self._clear_overlay()
            for adapter in self.sparse_adapters.values():
                adapter.remove_from_weights()
            self._disabled = True
            self.fishdip_layer.enable_adapters(False)

    def enable_adapter_layers(self) -> None:
        if self._disabled:
            self._disabled = False
            self.fishdip_layer.enable_adapters(True)
            active = self._active_fishdip()
            if len(active) > 1:
                self._apply_overlay(active)
            elif active:
                self.sparse_adapters[active[0]].put_into_weights()

    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        """The active adapters' deltas already live in the weights; merging marks them as part of the model,
        so they stop training until `unmerge_adapter()`. `adapter_names` (default: the active ones) join
        the merged ones, which become the active adapters."""
        names = list(adapter_names) if adapter_names else self._active_fishdip()
        if names and set(names) <= set(self.merged_adapters):
            warnings.warn("All adapters are already merged, nothing to do.")
            return
        self.enable_adapter_layers()
        names = self.merged_adapters + [n for n in names if n not in self.merged_adapters]  # merges accumulate
        if names != self._active_fishdip():
            self.set_adapter(names if len(names) > 1 else names[0], inference_mode=True)
        if len(names) == 1:
            self.sparse_adapters[names[0]].write_back()
        self.merged_adapters = list(names)
        self.fishdip_layer.merged_adapters = list(self.merged_adapters)

    def unmerge_adapter(self) -> None:
        if not self.merged_adapters:
            warnings.warn("Already unmerged. Nothing to do.")
        self.merged_adapters = []
        self.fishdip_layer.merged_adapters = []

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The base model with the deltas of `adapter_names` (default: the active adapters) in its weights and
        no FISH-DIP state."""
        self.enable_adapter_layers()
        names = list(adapter_names) if adapter_names else self._active_fishdip()
        if len(names) == 1:
            self._activate(names[0], trainable=False)
            self.sparse_adapters[names[0]].write_back()
        else:
            self._apply_overlay(names)
        return self._detach()

    def unload(self) -> nn.Module:
        """The base model with its original weights, bit for bit, and no FISH-DIP state."""
        self.enable_adapter_layers()
        self._clear_overlay()
        for adapter in self.sparse_adapters.values():
            adapter.remove_from_weights()
        return self._detach()

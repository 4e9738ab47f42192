"""The one adapter "layer" of a FISH-DIP model: the holder of every adapter's trainable values.

FISH-DIP replaces no module (its trained entries live in the weights themselves), but peft reports a
model's adapters through its tuner layers (`get_model_status`, `disable_adapter`). This module is that
layer: it holds `fishdip_values[adapter_name]` and mirrors the tuner's active, merged and disabled
adapters. It wraps no base layer, so the weight-related parts of `BaseTunerLayer` do not apply.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


class FishDipLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("fishdip_values",)
    other_param_names = ()

    def __init__(self, adapter_name: str):
        super().__init__()
        self.fishdip_values = nn.ParameterDict()
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self._disable_adapters = False

    def _apply(self, fn, recurse=True):
        """`.to(...)`, `.cuda()`, `.half()`: the values follow the device but keep their dtype (float32 unless
        `autocast_adapter_dtype=False`): the weights they train may be cast, the trained values keep their
        precision."""
        kept = {name: value.detach().clone() for name, value in self.fishdip_values.items()}
        super()._apply(fn, recurse)
        for name, value in self.fishdip_values.items():
            if value.dtype != kept[name].dtype:
                value.data = kept[name].to(value.device)
        return self

    def get_base_layer(self) -> nn.Module:
        return self

    @property
    def weight(self):
        raise AttributeError("FISH-DIP trains entries of the model's own weights; its layer has no weight.")

    @property
    def bias(self):
        raise AttributeError("FISH-DIP trains entries of the model's own weights; its layer has no bias.")

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        pass  # the values follow the weights they train (see `sparse.Slot.follow_device`)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        """Activate `adapter_names` on the model (peft calls this on every tuner layer): the tuner decides
        what the weights hold."""
        owner = self.__dict__.get("_owner")  # the tuner (kept out of the module tree; a copy follows its model)
        if owner is None:
            self._active_adapter = adapter_names
        else:
            owner.set_adapter(adapter_names, inference_mode=inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def forward(self, *args, **kwargs):
        raise RuntimeError("FishDipLayer holds values only; run the model instead.")

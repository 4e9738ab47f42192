"""Registration of FISH-DIP as a PEFT method."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import FishDipConfig
from .model import FishDipModel
from .peft_type import FISHDIP_PEFT_TYPE, PEFT_METHOD_NAME


def register() -> None:
    """Make `get_peft_model` and `PeftModel.from_pretrained` know FISH-DIP (idempotent; after a reload
    of the package the new classes replace the old ones)."""
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(FISHDIP_PEFT_TYPE)
    if registered is FishDipModel:
        return
    if registered is not None and getattr(registered, "is_fishdip_tuner", False):
        PEFT_TYPE_TO_CONFIG_MAPPING[FISHDIP_PEFT_TYPE] = FishDipConfig
        PEFT_TYPE_TO_TUNER_MAPPING[FISHDIP_PEFT_TYPE] = FishDipModel
        PEFT_TYPE_TO_PREFIX_MAPPING[FISHDIP_PEFT_TYPE] = FishDipModel.prefix
        return
    register_peft_method(name=PEFT_METHOD_NAME, config_cls=FishDipConfig, model_cls=FishDipModel)

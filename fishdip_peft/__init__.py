"""FISH-DIP: sample-aware dynamic sparse fine-tuning as a Hugging Face PEFT method."""

from .config import FishDipConfig
from .losses import forward_with_per_sample_losses, per_sample_losses
from .model import FishDipModel
from .registration import FISHDIP_PEFT_TYPE, register

register()

__all__ = [
    "FISHDIP_PEFT_TYPE",
    "FishDipConfig",
    "FishDipModel",
    "forward_with_per_sample_losses",
    "per_sample_losses",
]
__version__ = "0.1.0"

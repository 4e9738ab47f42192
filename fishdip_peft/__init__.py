"""FISH-DIP: sample-aware dynamic sparse fine-tuning as a Hugging Face PEFT method."""

from .adafactor import SparseAdafactor
from .config import FishDipConfig
from .distributed import prepare_with_accelerator, register_optimizer, sync_gradients
from .losses import forward_with_per_sample_losses, per_sample_losses
from .model import FishDipModel
from .registration import FISHDIP_PEFT_TYPE, register

register()

_TRAINING_EXPORTS = (
    "FishDipSeq2SeqTrainer",
    "FishDipTrainer",
    "FishDipTrainerMixin",
    "load_training_state",
    "save_training_state",
)


def __getattr__(name):
    if name in _TRAINING_EXPORTS:  # imported on first use: it loads transformers' Trainer
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FISHDIP_PEFT_TYPE",
    "FishDipConfig",
    "FishDipModel",
    "SparseAdafactor",
    "forward_with_per_sample_losses",
    "per_sample_losses",
    "prepare_with_accelerator",
    "register_optimizer",
    "sync_gradients",
    *_TRAINING_EXPORTS,
]
__version__ = "0.1.0"

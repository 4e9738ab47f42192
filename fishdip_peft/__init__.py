"""FISH-DIP: sample-aware dynamic sparse fine-tuning as a Hugging Face PEFT method."""

from .adafactor import SparseAdafactor
from .config import FishDipConfig
from .formats import load_training_state, save_training_state
from .integrations import prepare_with_accelerator, register_optimizer, sync_gradients
from .lookup import fishdip_tuner
from .losses import forward_with_per_sample_losses, per_sample_losses
from .model import FishDipModel
from .peft_type import FISHDIP_PEFT_TYPE
from .registration import register

register()

_TRAINER_EXPORTS = ("FishDipSeq2SeqTrainer", "FishDipTrainer", "FishDipTrainerMixin")


def __getattr__(name):
    if name in _TRAINER_EXPORTS:  # imported on first use: it loads transformers' Trainer
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FISHDIP_PEFT_TYPE",
    "FishDipConfig",
    "FishDipModel",
    "SparseAdafactor",
    "fishdip_tuner",
    "forward_with_per_sample_losses",
    "load_training_state",
    "per_sample_losses",
    "prepare_with_accelerator",
    "register_optimizer",
    "save_training_state",
    "sync_gradients",
    *_TRAINER_EXPORTS,
]
__version__ = "0.2.0"

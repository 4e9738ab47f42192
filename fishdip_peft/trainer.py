"""FISH-DIP with the Hugging Face Trainer: `FishDipTrainer` and `FishDipSeq2SeqTrainer`.

FISH-DIP trains under the plain `Trainer` too (automatic mode: the per-sample losses come from the
training forward passes, refreshes count optimizer steps). These drop-in replacements add:
- exact resumption: checkpoints hold `fishdip_state.pt` (masks, pools, schedules) and
  `resume_from_checkpoint` restores it;
- re-scoring of the training set for the Fisher samples, as the FISH-DIP authors do (`rescore`);
- `optim="adafactor"` as `SparseAdafactor` (transformers' Adafactor per weight tensor);
- several processes: the model is placed but not wrapped in DDP, and the values' gradient is averaged
  before clipping;
- logs of the refresh count, K and the pooled losses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import integrations
from .adafactor import SparseAdafactor
from .formats import STATE_NAME, has_training_state, load_training_state, save_training_state
from .losses import per_sample_losses_from_outputs
from .lookup import fishdip_tuner

logger = logging.getLogger(__name__)

# Re-scoring the training set at a refresh costs about N forward passes; the m steps between refreshes
# cost about 3 (forward + backward) x m x samples-per-step. "auto" re-scores when that is at most 10%.
RESCORE_MAX_SHARE = 0.1
ADAFACTOR_OPTIM_ARGS = {"scale_parameter": bool, "relative_step": bool, "warmup_init": bool,
                        "clip_threshold": float, "decay_rate": float}


def check_complete_checkpoint(folder: str) -> None:
    """Refuse a checkpoint folder an interrupted save left incomplete. FISH-DIP's state is written first
    and the Trainer's `trainer_state.json` last, so a folder without the latter is unfinished."""
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        raise ValueError(
            f"{folder} is an incomplete checkpoint (no {TRAINER_STATE_NAME}; its save was probably interrupted): "
            "resume from an earlier checkpoint, or delete this folder and use resume_from_checkpoint=True."
        )


def last_complete_checkpoint(output_dir: str) -> str:
    """The newest `checkpoint-N` folder of `output_dir` whose save finished."""
    folders = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            prefix, _, number = name.rpartition("-")
            if prefix == PREFIX_CHECKPOINT_DIR and number.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
                folders.append((int(number), os.path.join(output_dir, name)))
    for _, folder in sorted(folders, reverse=True):
        try:
            check_complete_checkpoint(folder)
        except ValueError:
            logger.warning("skipping %s: an interrupted save left it incomplete", folder)
            continue
        return folder
    raise ValueError(f"no complete checkpoint in {output_dir} to resume from (resume_from_checkpoint=True).")


def _parse_adafactor_args(optim_args: Optional[str]) -> dict[str, Any]:
    parsed = {}
    for item in (optim_args or "").replace(" ", "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in ADAFACTOR_OPTIM_ARGS or not value:
            raise ValueError(
                f"optim_args item {item!r} is not understood for optim='adafactor'; use KEY=VALUE with KEY in "
                f"{sorted(ADAFACTOR_OPTIM_ARGS)}, e.g. optim_args='scale_parameter=True'."
            )
        if ADAFACTOR_OPTIM_ARGS[key] is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"optim_args {key} must be True or False, got {value!r}.")
            parsed[key] = value.lower() == "true"
        else:
            parsed[key] = float(value)
    return parsed


# -- the Trainer -------------------------------------------------------------------------------------
class FishDipTrainerMixin:
    """What `FishDipTrainer` adds to a `transformers.Trainer` (see the module docstring).

    Args:
        rescore: How the Fisher samples are chosen. True: at the first mask and at every refresh, score
            every training sample with the current weights (no gradient) and take the `num_regressing`
            highest losses, as the FISH-DIP authors do. False: the highest latest losses seen in training
            batches since the last refresh. "auto" (default): True when the training set has a length and
            re-scoring it costs at most 10% of the `update_every` steps between refreshes, i.e.
            N <= 0.3 x update_every x samples per optimizer step.
    """

    def __init__(self, *args, rescore: Union[bool, str] = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        fishdip_tuner(self.model)
        if rescore not in (True, False, "auto"):
            raise ValueError(f"rescore must be True, False or 'auto', got {rescore!r}.")
        self.fishdip_rescore = rescore
        if self.args.n_gpu > 1:
            raise ValueError(
                "FISH-DIP does not run under torch.nn.DataParallel (one process, several GPUs): launch one "
                "process per GPU with `accelerate launch` or torchrun instead."
            )
        self.fishdip_model.set_per_sample_losses(self.per_sample_losses)

    @property
    def fishdip_model(self):
        """The `FishDipModel` being trained."""
        return fishdip_tuner(self.model)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        integrations.check_accelerator(self.accelerator)
        integrations.keep_fishdip_models_unwrapped(self.accelerator)

    def create_optimizer(self):
        """`optim="adafactor"` trains with `SparseAdafactor` (transformers' Adafactor per weight tensor,
        with the arguments `Trainer` gives Adafactor: `scale_parameter=False, relative_step=False`);
        `optim_args` may override them, e.g. "scale_parameter=True" for the FISH-DIP authors' setting."""
        if self.optimizer is None and self.args.optim == "adafactor":
            kwargs = {"scale_parameter": False, "relative_step": False, **_parse_adafactor_args(self.args.optim_args)}
            lr = None if kwargs["relative_step"] else self.args.learning_rate
            self.optimizer = SparseAdafactor(self.model, lr=lr, weight_decay=self.args.weight_decay, **kwargs)
            return self.optimizer
        return super().create_optimizer()

    def create_optimizer_and_scheduler(self, num_training_steps: int):
        super().create_optimizer_and_scheduler(num_training_steps)
        integrations.register_optimizer(self.model, self.optimizer)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint is True:  # the last *complete* checkpoint, not a half-written one
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str):
            check_complete_checkpoint(resume_from_checkpoint)
        if self._fishdip_rescoring_on():
            self.fishdip_model.set_rescoring(
                self._fishdip_rescoring_batches, lambda model, outputs, batch: self.per_sample_losses(model, outputs, batch)
            )
        else:
            self.fishdip_model.set_rescoring(None)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- re-scoring ----------------------------------------------------------------------------------
    def _fishdip_rescoring_on(self) -> bool:
        sized = self.train_dataset is not None and hasattr(self.train_dataset, "__len__")
        if self.fishdip_rescore is True:
            if not sized:
                raise ValueError("rescore=True needs a training set with a length (not an IterableDataset).")
            return True
        if self.fishdip_rescore is False or not sized:
            return False
        tuner = self.fishdip_model
        config = tuner.peft_config[tuner._single_active()]
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return len(self.train_dataset) <= RESCORE_MAX_SHARE * 3 * config.update_every * per_step

    def _fishdip_rescoring_batches(self):
        """The training set in order, in evaluation batches, each process its own shard."""
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="FISH-DIP re-scoring",
            batch_size=self.args.eval_batch_size,
            sampler_fn=self._get_eval_sampler,
            dataloader_key="fishdip_rescoring",
        )

    # -- the step ------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            integrations.sync_gradients(self.model)
        return loss

    def per_sample_losses(self, model, outputs, batch: Mapping[str, Any]) -> torch.Tensor:
        """One loss per sample of `batch`, used to pool the highest-loss samples. Override for models
        whose outputs `per_sample_losses_from_outputs` does not handle."""
        return per_sample_losses_from_outputs(model, outputs, batch["labels"])

    # -- logging -------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            tuner = self.fishdip_model
            logs["fishdip_refreshes"] = tuner.refresh_count
            logs["fishdip_k"] = tuner.num_trainable
            pooled = tuner.pool_losses()
            if pooled:
                logs["fishdip_pool_loss_max"] = pooled[0]
                logs["fishdip_pool_loss_min"] = pooled[-1]
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        directory = os.path.join(self._get_output_dir(trial=trial), folder)
        save_training_state(self.model, directory, write=self.args.should_save)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if has_training_state(resume_from_checkpoint):
            load_training_state(model, resume_from_checkpoint)
            return
        logger.warning(
            "%s holds no %s: loading the adapter deltas only; the mask is rebuilt at the next step and "
            "training does not resume exactly.",
            resume_from_checkpoint,
            STATE_NAME,
        )
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        # Trainer maps the files onto `args.device`, "cpu:<rank>" here, which torch.load cannot restore to.
        optimizer_file, scheduler_file = (os.path.join(checkpoint, name) for name in (OPTIMIZER_NAME, SCHEDULER_NAME))
        if os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file):
            self.optimizer.load_state_dict(torch.load(optimizer_file, map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(scheduler_file, map_location="cpu", weights_only=True))

    def _load_best_model(self):
        if has_training_state(self.state.best_model_checkpoint):
            load_training_state(self.model, self.state.best_model_checkpoint)
        else:
            super()._load_best_model()


class FishDipTrainer(FishDipTrainerMixin, Trainer):
    """`transformers.Trainer` for FISH-DIP models; use it exactly like `Trainer`."""


class FishDipSeq2SeqTrainer(FishDipTrainerMixin, Seq2SeqTrainer):
    """`transformers.Seq2SeqTrainer` for FISH-DIP models; use it exactly like `Seq2SeqTrainer`."""

"""FISH-DIP with the Hugging Face Trainer: `FishDipTrainer` and `FishDipSeq2SeqTrainer`.

Both are drop-in replacements for `Trainer` / `Seq2SeqTrainer` on a model built by
`get_peft_model(model, FishDipConfig(...))`. On every training micro-batch the per-sample losses
are computed from the logits the loss came from and the samples are pooled; on the first
micro-batch of each optimizer step, between its forward and backward, `FishDipModel.step` counts
the step and refreshes the mask when due, so `update_every` counts optimizer steps and a refresh
never falls inside a gradient accumulation. Checkpoints hold `fishdip_state.pt`, from which
training resumes exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import distributed
from .adafactor import SparseAdafactor
from .atomic import atomic_write
from .distributed import fishdip_tuner
from .losses import per_sample_losses_from_outputs

logger = logging.getLogger(__name__)

STATE_NAME = "fishdip_state.pt"
STATE_FORMAT = 1
# Re-scoring the training set at a refresh costs about N forward passes; the m steps between refreshes
# cost about 3 (forward + backward) x m x samples-per-step. "auto" re-scores when that is at most 10%.
RESCORE_MAX_SHARE = 0.1
ADAFACTOR_OPTIM_ARGS = {"scale_parameter": bool, "relative_step": bool, "warmup_init": bool,
                        "clip_threshold": float, "decay_rate": float}


# -- checkpoint state --------------------------------------------------------------------------------
def has_training_state(directory: Optional[str]) -> bool:
    return directory is not None and os.path.isfile(os.path.join(directory, STATE_NAME))


def save_training_state(model, directory: str, write: bool = True) -> None:
    """Write `directory/fishdip_state.pt`: the mask, the trained values and weights, every process's
    pool and the step counters. Every process must call it (the pools are gathered); only those with
    `write=True` write. The file appears whole or not at all."""
    tuner = fishdip_tuner(model)
    state = tuner.training_state_dict()
    state.pop("pool")
    state["pools"] = distributed.gather_pool_states(tuner)
    state["format"] = STATE_FORMAT
    if write:
        os.makedirs(directory, exist_ok=True)
        atomic_write(os.path.join(directory, STATE_NAME), lambda tmp_path: torch.save(state, tmp_path))


def load_training_state(model, directory: str) -> None:
    """Restore what `save_training_state` wrote into `directory` (see `FishDipModel.load_training_state_dict`)."""
    tuner = fishdip_tuner(model)
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: this checkpoint was not written by FishDipTrainer.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}; this version reads format {STATE_FORMAT}.")
    state["pool"] = distributed.pool_state_for_this_process(
        state.pop("pools"), tuner.peft_config[tuner.active_adapter].num_regressing
    )
    tuner.load_training_state_dict(state)


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
        checkpointing = self.args.gradient_checkpointing_kwargs or {}
        if self.args.gradient_checkpointing and checkpointing.get("use_reentrant", True) is False:
            raise ValueError(
                "FISH-DIP supports gradient checkpointing with use_reentrant=True (the default) only: the mask "
                "may change between the forward pass and its recomputation, which non-reentrant checkpointing rejects."
            )
        self._fishdip_counted_step: Optional[int] = None
        self._fishdip_in_training_step = False

    @property
    def fishdip_model(self):
        """The `FishDipModel` being trained."""
        return fishdip_tuner(self.model)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        distributed.check_accelerator(self.accelerator)
        distributed.keep_fishdip_models_unwrapped(self.accelerator)

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
        distributed.register_optimizer(self.model, self.optimizer)

    def train(self, *args, **kwargs):
        self._fishdip_counted_step = None
        if self._fishdip_rescoring_on():
            self.fishdip_model.set_rescoring(
                self._fishdip_rescoring_batches, lambda model, outputs, batch: self.per_sample_losses(model, outputs, batch)
            )
        else:
            self.fishdip_model.set_rescoring(None)
        return super().train(*args, **kwargs)

    # -- re-scoring ----------------------------------------------------------------------------------
    def _fishdip_rescoring_on(self) -> bool:
        sized = self.train_dataset is not None and hasattr(self.train_dataset, "__len__")
        if self.fishdip_rescore is True:
            if not sized:
                raise ValueError("rescore=True needs a training set with a length (not an IterableDataset).")
            return True
        if self.fishdip_rescore is False or not sized:
            return False
        config = self.fishdip_model.peft_config[self.fishdip_model.active_adapter]
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
        self._fishdip_in_training_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            self._fishdip_in_training_step = False
        if self.accelerator.sync_gradients:
            distributed.sync_gradients(self.model)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self._fishdip_in_training_step:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if "labels" not in inputs:
            raise ValueError("FISH-DIP ranks samples by their loss: the training batches need `labels`.")
        batch = dict(inputs)
        loss, outputs = super().compute_loss(
            model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        self._fishdip_record(self.per_sample_losses(model, outputs, batch), batch)
        return (loss, outputs) if return_outputs else loss

    def per_sample_losses(self, model, outputs, batch: Mapping[str, Any]) -> torch.Tensor:
        """One loss per sample of `batch`, used to pool the highest-loss samples. Override for models
        whose outputs `per_sample_losses_from_outputs` does not handle."""
        return per_sample_losses_from_outputs(model, outputs, batch["labels"])

    def _fishdip_record(self, losses: torch.Tensor, batch: Mapping[str, Any]) -> None:
        tuner = self.fishdip_model
        if self._fishdip_counted_step != self.state.global_step:
            self._fishdip_counted_step = self.state.global_step
            tuner.step(losses, batch)
        else:
            tuner.offer(losses, batch)

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

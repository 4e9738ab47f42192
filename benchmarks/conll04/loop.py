"""The CoNLL'04 training loop shared by every method, resumable mid-run.

`train` runs a fixed number of optimizer steps over a stream of epochs of the training subset. The
optimizer and learning-rate schedule are part of the run's `TrainSettings`:

* ``adamw``: `torch.optim.AdamW` (betas 0.9/0.999) on the trainable parameters;
* ``adafactor``: `transformers.Adafactor(scale_parameter=True, relative_step=False, warmup_init=False)`
  as the FISH-DIP authors use it; for FISH-DIP methods `fishdip_peft.SparseAdafactor`, its exact sparse
  counterpart (per weight tensor, from the trainable entries);
* ``constant`` or ``linear`` (decay to 0 over the run, no warm-up, as the Trainer's default) rates.

Every step computes the token-mean loss and one loss per sample (`batch_losses`); methods whose registry
entry `calls_step` (`benchmarks.methods`; FISH-DIP's) call ``model.step(losses, batch)`` between forward and
backward; gradients are clipped to `max_grad_norm`.
With `rescore`, FISH-DIP re-scores the whole training subset with the current weights for the first
mask and at every refresh. With `early_stop_loss`, training stops once the batch loss has stayed below
it for `early_stop_patience` consecutive steps (the authors' rule: 1e-6 for 20 steps).

With a `checkpoint_dir`, the loop saves its whole state (trainable state, optimizer, schedule, random
streams, log, clocks) atomically every `checkpoint_seconds` and when training ends; called again with
the same directory and settings it resumes from there and ends bit for bit where an uninterrupted run
ends. A checkpoint made with other settings is refused with a clear error.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "loop_state.pt"
STATE_FORMAT = 1
ADAFACTOR_ARGS = dict(scale_parameter=True, relative_step=False, warmup_init=False)
ADAMW_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class TrainSettings:
    """Everything about a run's optimisation besides the model, data and method."""

    steps: int
    learning_rate: float
    seed: int
    batch_size: int = 8
    optimizer: str = "adamw"  # "adamw" | "adafactor"
    lr_schedule: str = "constant"  # "constant" | "linear"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    early_stop_loss: float | None = None
    early_stop_patience: int = 20
    rescore: bool = False

    def __post_init__(self):
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"lr_schedule must be 'constant' or 'linear', got {self.lr_schedule!r}")


class BatchStream:
    """Indices of successive batches: epochs of seeded permutations of ``range(size)``, concatenated.

    Its position can be saved and restored (`state_dict`), so a resumed run draws the same batches.
    """

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, min(batch_size, size)
        self.rng = random.Random(seed)
        self.pending: list[int] = []

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        while len(self.pending) < self.batch_size:
            epoch = list(range(self.size))
            self.rng.shuffle(epoch)
            self.pending.extend(epoch)
        batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "pending": list(self.pending)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])
        self.pending = list(state["pending"])


def make_optimizer(model, params: list[torch.nn.Parameter], settings: TrainSettings, fishdip: bool):
    if settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, betas=ADAMW_BETAS,
                                      weight_decay=settings.weight_decay)
    elif fishdip:
        from fishdip_peft import SparseAdafactor

        optimizer = SparseAdafactor(model, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                    **ADAFACTOR_ARGS)
    else:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, lr=settings.learning_rate, weight_decay=settings.weight_decay, **ADAFACTOR_ARGS)
    if fishdip:  # so a refresh remaps the optimizer's state from the first step on, also after a resume
        from fishdip_peft import register_optimizer

        register_optimizer(model, optimizer)
    return optimizer


def make_schedule(optimizer, settings: TrainSettings):
    if settings.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / settings.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# -- checkpoints ------------------------------------------------------------------------------------
def _trainable_state(model, params, fishdip: bool) -> dict[str, Any]:
    if fishdip:
        from fishdip_peft.formats import adapter_training_state

        tuner = model.base_model
        return {name: adapter_training_state(tuner, name) for name in tuner.sparse_adapters}
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: p.detach().cpu().clone() for p in params}


@torch.no_grad()
def _load_trainable_state(model, params, fishdip: bool, state: dict[str, Any]) -> None:
    if fishdip:
        model.base_model.load_training_state({"adapters": state})
        return
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in params if names[id(p)] not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks trainable parameters {missing[:3]}; it is from another method.")
    for p in params:
        p.copy_(state[names[id(p)]].to(p.device, p.dtype))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the loop state atomically (a temporary file renamed over `path`)."""
    from fishdip_peft.atomic import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(str(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, settings: TrainSettings, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The saved loop state at `path`, or None if there is none. Refuses one made with other settings."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: name it and the way out
        raise ValueError(f"{path} is not a readable training checkpoint ({error}); delete it to start over.") from error
    if state.get("format") != STATE_FORMAT or state.get("settings") != asdict(settings) \
            or state.get("identity") != identity:
        raise ValueError(
            f"{path} was saved by a run with other settings ({state.get('settings')}, {state.get('identity')}); "
            "delete it to start this run over."
        )
    return state


# -- the loop ----------------------------------------------------------------------------------------
def train(prepared, encoder, sentences, *, settings: TrainSettings, batch_losses,
          checkpoint_dir: str | Path | None = None, checkpoint_seconds: float = 600.0,
          identity: dict[str, Any] | None = None, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train `prepared.model` (a `benchmarks.methods.PreparedMethod`) on `sentences`; returns ``{"log",
    "train_seconds", "train_cpu_seconds", "stopped_early_at", "resumed_from"}``.

    The method's registry entry says whether the model is a FISH-DIP adapter (`fishdip_adapter`: sparse
    Adafactor, re-scoring, its training state) and whether each step calls `step` (`calls_step`).
    `batch_losses(model, encoder, examples)` returns the batch's token-mean loss and per-sample losses.
    `identity` (e.g. method, fraction, seed, model) is stored in checkpoints and checked on resume.
    `stop_after` (tests only) ends the call after that many steps, as an interruption would.
    """
    from tqdm.auto import tqdm

    from benchmarks.methods import get_method

    method = get_method(prepared.name)
    model, fishdip = prepared.model, method.fishdip_adapter
    torch.manual_seed(settings.seed)
    examples = [encoder.train_example(s) for s in sentences]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the prepared model has no trainable parameter.")
    optimizer = make_optimizer(model, params, settings, fishdip)
    schedule = make_schedule(optimizer, settings)
    stream = BatchStream(len(examples), settings.batch_size, settings.seed)
    if fishdip and settings.rescore:
        subset = [examples[i : i + settings.batch_size] for i in range(0, len(examples), settings.batch_size)]
        model.base_model.set_rescoring([encoder.collate(chunk) for chunk in subset])
    identity = dict(identity or {})
    path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    log: list[dict] = []
    below, stopped_early_at, done, elapsed, cpu_elapsed, resumed_from = 0, None, 0, 0.0, 0.0, None
    saved = load_checkpoint(path, settings, identity) if path is not None else None
    if saved is not None:
        _load_trainable_state(model, params, fishdip, saved["trainable"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        stream.load_state_dict(saved["stream"])
        torch.set_rng_state(saved["torch_rng"])
        log, below, stopped_early_at = list(saved["log"]), saved["below"], saved["stopped_early_at"]
        done, elapsed, cpu_elapsed, resumed_from = saved["step"], saved["train_seconds"], saved["train_cpu_seconds"], saved["step"]

    def checkpoint():
        save_checkpoint(path, {
            "format": STATE_FORMAT, "settings": asdict(settings), "identity": identity, "step": done,
            "trainable": _trainable_state(model, params, fishdip), "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(), "stream": stream.state_dict(), "torch_rng": torch.get_rng_state(),
            "log": log, "below": below, "stopped_early_at": stopped_early_at,
            "train_seconds": elapsed + (time.perf_counter() - start), "train_cpu_seconds":
                cpu_elapsed + (time.process_time() - cpu_start),
        })

    start, cpu_start, last_save = time.perf_counter(), time.process_time(), time.perf_counter()
    model.train()
    finished = stopped_early_at is not None or done >= settings.steps
    bar = tqdm(total=settings.steps, initial=done, desc="train", disable=not progress or finished, mininterval=5,
               file=sys.stderr)
    while not finished:
        rows = next(stream)
        step_start = time.perf_counter()
        mean_loss, losses = batch_losses(model, encoder, [examples[i] for i in rows])
        refreshed = None
        if method.calls_step:  # the pool keeps the padded batch; the Fisher pass trims each sample's padding
            refreshed = method.step(prepared, losses, encoder.collate([examples[i] for i in rows]))
        mean_loss.backward()
        method.after_backward(prepared)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        done += 1
        loss = float(mean_loss.detach())
        entry = {"step": done, "loss": round(loss, 6), "sample_ids": list(rows),
                 "per_sample_losses": [round(float(v), 6) for v in losses.detach()],
                 "grad_norm": round(float(grad_norm), 6), "seconds": round(time.perf_counter() - step_start, 3)}
        if refreshed is not None:
            entry["mask_changed"] = refreshed
        log.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4g}")
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {done}")
        below = below + 1 if settings.early_stop_loss is not None and loss < settings.early_stop_loss else 0
        if settings.early_stop_loss is not None and below >= settings.early_stop_patience:
            stopped_early_at = done
        finished = stopped_early_at is not None or done >= settings.steps
        if path is not None and (finished or time.perf_counter() - last_save >= checkpoint_seconds):
            checkpoint()
            last_save = time.perf_counter()
        if stop_after is not None and done - (resumed_from or 0) >= stop_after and not finished:
            bar.close()
            return {"interrupted": True, "log": log}
    bar.close()
    model.eval()
    return {
        "log": log,
        "train_seconds": round(elapsed + time.perf_counter() - start, 3),
        "train_cpu_seconds": round(cpu_elapsed + time.process_time() - cpu_start, 3),
        "stopped_early_at": stopped_early_at,
        "resumed_from": resumed_from,
    }


def remove_checkpoint(checkpoint_dir: str | Path | None) -> None:
    """Delete a finished run's loop state."""
    if checkpoint_dir is None:
        return
    path = Path(checkpoint_dir) / STATE_FILE
    if path.is_file():
        os.remove(path)
    try:
        Path(checkpoint_dir).rmdir()
    except OSError:
        pass

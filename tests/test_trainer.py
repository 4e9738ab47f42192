"""FishDipTrainer / FishDipSeq2SeqTrainer: the step's timing, counting, logging, evaluation, saving, precision."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Seq2SeqTrainingArguments, TrainingArguments

from fishdip_peft import (
    FishDipConfig,
    FishDipSeq2SeqTrainer,
    FishDipTrainer,
    forward_with_per_sample_losses,
)
from fishdip_peft.integrations import check_accelerator
from fishdip_peft.losses import per_sample_losses_from_outputs
from tests.models import causal_batch, seq2seq_batch, tiny_bert_classifier, tiny_llama, tiny_t5

CONFIG = dict(density=0.05, update_every=2, num_regressing=3)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the cores are shared). Afterwards the
    environment and accelerate's process-wide state are put back: TrainingArguments(bf16=True) sets
    ACCELERATE_MIXED_PRECISION, which later Trainers in this process would otherwise inherit."""
    threads, environment = torch.get_num_threads(), dict(os.environ)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(environment)
    AcceleratorState._reset_state(reset_partial_state=True)


class RowDataset(torch.utils.data.Dataset):
    """Samples of `make_batch(seed)` batches, one row each."""

    def __init__(self, size: int = 48, make_batch=causal_batch):
        self.rows = []
        for seed in range(-(-size // 4)):
            batch = make_batch(seed)
            self.rows += [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]
        self.rows = self.rows[:size]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def fishdip_llama(dtype=torch.float32, **config):
    return get_peft_model(tiny_llama().to(dtype), FishDipConfig(**{**CONFIG, **config}))


def training_args(output_dir, steps: int = 6, args_class=TrainingArguments, **overrides) -> TrainingArguments:
    settings = dict(
        max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.1,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    settings.update(overrides)
    return args_class(str(output_dir), **settings)


def eligible_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for _, p in model.base_model.eligible_parameters()])


class Recorder:
    """Spies on a FishDipModel: what step/offer/refresh_mask saw, at which Trainer step."""

    def __init__(self, trainer):
        self.events, tuner = [], trainer.fishdip_model
        for name in ("offer", "refresh_mask"):
            self._wrap(tuner, name, trainer)

    def _wrap(self, tuner, name, trainer):
        original = getattr(tuner, name)

        def spy(*args, **kwargs):
            batch = args[1] if len(args) > 1 else None
            self.events.append((name, trainer.state.global_step, None if batch is None else dict(batch)))
            return original(*args, **kwargs)

        setattr(tuner, name, spy)

    def names(self, name):
        return [step for kind, step, _ in self.events if kind == name]


def test_refresh_counts_optimizer_steps_and_never_splits_an_accumulation(tmp_path):
    model = fishdip_llama()
    trainer = FishDipTrainer(
        model=model,
        args=training_args(tmp_path, steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2),
        train_dataset=RowDataset(),
    )
    recorder = Recorder(trainer)
    trainer.train()
    assert recorder.names("offer") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]  # every micro-batch is pooled
    events = [(kind, step) for kind, step, _ in recorder.events]
    refreshes = [i for i, (kind, _) in enumerate(events) if kind == "refresh_mask"]
    assert [events[i][1] for i in refreshes] == [0, 2, 4]  # update_every=2 counts optimizer steps
    for i in refreshes:  # right after the first micro-batch of its optimizer step, before the second
        assert events[i - 1][0] == "offer" and events[i + 1] == ("offer", events[i][1])
        assert i < 2 or events[i - 2][1] != events[i][1]
    tuner = trainer.fishdip_model
    assert tuner.step_count == 6 and tuner.refresh_count == 3
    assert int(tuner.mask.sum()) == tuner.num_trainable


def test_trainer_matches_the_manual_loop_bit_for_bit(tmp_path):
    """The Trainer's automatic mode is the documented manual loop: forward, step(), backward, optimizer step."""
    model = fishdip_llama()
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, max_grad_norm=0.0), train_dataset=RowDataset())
    recorder = Recorder(trainer)
    trainer.train()

    manual = fishdip_llama()
    optimizer = torch.optim.AdamW([manual.base_model.fishdip_state.values], lr=1e-2, weight_decay=0.1, fused=True)
    for _, _, batch in [e for e in recorder.events if e[0] == "offer"]:
        outputs, losses = forward_with_per_sample_losses(manual, batch)
        manual.base_model.step(losses, batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(manual.base_model.mask, model.base_model.mask)
    assert torch.equal(eligible_weights(manual), eligible_weights(model))


def test_frozen_entries_stay_and_logs_report_the_mask(tmp_path):
    model = fishdip_llama()
    before = eligible_weights(model)
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, steps=4), train_dataset=RowDataset())
    trainer.train()
    after = eligible_weights(model)
    touched = torch.zeros_like(before, dtype=torch.bool)
    for slot in model.base_model.fishdip_state.slots:
        touched[slot.flat_offset + slot.touched] = True
    assert torch.equal(before[~touched], after[~touched])
    assert not torch.equal(before[touched], after[touched])
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["fishdip_refreshes"] for h in logs] == [1, 1, 2, 2]
    assert all(h["fishdip_k"] == model.base_model.num_trainable for h in logs)
    assert logs[1]["fishdip_pool_loss_max"] >= logs[1]["fishdip_pool_loss_min"] > 0
    assert "fishdip_pool_loss_max" not in logs[2]  # the pool was just drained by a refresh


def test_evaluation_and_save_model_write_the_sparse_delta(tmp_path):
    model = fishdip_llama()
    args = training_args(tmp_path, steps=4, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = FishDipTrainer(model=model, args=args, train_dataset=RowDataset(), eval_dataset=RowDataset(8))
    trainer.train()
    assert trainer.fishdip_model.step_count == 4  # evaluation pools nothing and counts no step
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]

    trainer.save_model(str(tmp_path / "adapter"))
    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(".fishdip_" in key for key in tensors)
    assert sum(v.numel() for k, v in tensors.items() if k.endswith("fishdip_deltas")) < eligible_weights(model).numel()
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))
    batch = causal_batch(99)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_bf16_base_weights_and_bf16_mixed_precision(tmp_path):
    model = fishdip_llama(dtype=torch.bfloat16)
    base = eligible_weights(model)
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, steps=3, bf16=True), train_dataset=RowDataset())
    trainer.train()
    state = model.base_model.fishdip_state
    assert state.values.dtype == torch.float32
    assert all(slot.param.dtype == torch.bfloat16 for slot in state.slots)
    for slot in state.slots:
        if slot.index.numel():
            assert torch.equal(slot.flat[slot.index], state.values[slot.value_range()].to(torch.bfloat16))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(base, eligible_weights(model))


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, reentrant):
    runs = []
    for checkpointing in (False, True):
        model = fishdip_llama()
        args = training_args(tmp_path, steps=3, gradient_checkpointing=checkpointing,
                             gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        FishDipTrainer(model=model, args=args, train_dataset=RowDataset()).train()
        runs.append((model.base_model.mask.clone(), eligible_weights(model)))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_seq2seq_trainer_trains_and_evaluates_t5(tmp_path):
    model = get_peft_model(tiny_t5(), FishDipConfig(**CONFIG))
    args = training_args(tmp_path, steps=3, args_class=Seq2SeqTrainingArguments, per_device_eval_batch_size=4)
    trainer = FishDipSeq2SeqTrainer(
        model=model, args=args, train_dataset=RowDataset(24, seq2seq_batch), eval_dataset=RowDataset(8, seq2seq_batch)
    )
    trainer.train()
    assert trainer.fishdip_model.refresh_count == 2
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_per_sample_losses_for_classifiers():
    model = tiny_bert_classifier()
    batch = {"input_ids": torch.randint(1, 64, (3, 8)), "labels": torch.tensor([0, 2, 1])}
    outputs = model(**batch)
    losses = per_sample_losses_from_outputs(model, outputs, batch["labels"])
    torch.testing.assert_close(losses.mean(), outputs.loss.detach())
    with pytest.raises(ValueError, match="override"):
        per_sample_losses_from_outputs(model, {"logits": torch.zeros(3)}, batch["labels"])


def test_refuses_models_and_modes_it_cannot_train(tmp_path):
    with pytest.raises(TypeError, match="FishDipConfig"):
        FishDipTrainer(model=tiny_llama(), args=training_args(tmp_path), train_dataset=RowDataset(8))
    for kind, name in ((DistributedType.FSDP, "FSDP"), (DistributedType.DEEPSPEED, "DeepSpeed")):
        with pytest.raises(NotImplementedError, match=name):
            check_accelerator(SimpleNamespace(distributed_type=kind))
    check_accelerator(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))


def test_training_batches_need_labels(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "labels"} for row in RowDataset(8).rows]
    trainer = FishDipTrainer(model=fishdip_llama(), args=training_args(tmp_path, steps=1), train_dataset=rows)
    with pytest.raises(ValueError, match="did not return a loss"):  # the Trainer's own, clear error
        trainer.train()
    assert not os.path.exists(tmp_path / "checkpoint-1")

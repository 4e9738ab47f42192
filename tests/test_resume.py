"""Resuming FishDipTrainer from a checkpoint ends bit for bit where the uninterrupted run ends."""

from __future__ import annotations

import os

import pytest
import torch

from fishdip_peft import FishDipTrainer, load_training_state, save_training_state
from fishdip_peft.distributed import merge_pool_states
from fishdip_peft.formats import STATE_NAME
from tests.test_trainer import RowDataset, eligible_weights, fishdip_llama, one_thread, training_args  # noqa: F401


def snapshot(trainer) -> dict:
    tuner = trainer.fishdip_model
    state = tuner.fishdip_state
    optimizer_state = trainer.optimizer.optimizer.state[state.values]
    return {
        "mask": tuner.mask.clone(),
        "weights": eligible_weights(trainer.model).clone(),
        "values": state.values.detach().clone(),
        "exp_avg": optimizer_state["exp_avg"].clone(),
        "exp_avg_sq": optimizer_state["exp_avg_sq"].clone(),
        "counters": (tuner.step_count, tuner.refresh_count, trainer.state.global_step),
        "touched": [slot.touched.clone() for slot in state.slots],
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["counters"] == b["counters"]
    for key in ("mask", "weights", "values", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(x, y) for x, y in zip(a["touched"], b["touched"]))


def run(output_dir, steps=6, resume=None, **overrides):
    config = {k: overrides.pop(k) for k in ("update_every",) if k in overrides}
    model = fishdip_llama(**config)
    save_steps = overrides.pop("save_steps", 3)
    args = training_args(output_dir, steps=steps, save_strategy="steps", save_steps=save_steps, **overrides)
    trainer = FishDipTrainer(model=model, args=args, train_dataset=RowDataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize(
    "update_every, checkpoint, accumulation",
    [(2, 3, 1), (3, 3, 1), (2, 4, 2)],
    ids=["pool-empty-at-save", "refresh-right-after-resume", "gradient-accumulation"],
)
def test_resume_ends_where_the_uninterrupted_run_ends(tmp_path, update_every, checkpoint, accumulation):
    common = dict(update_every=update_every, save_steps=checkpoint, gradient_accumulation_steps=accumulation,
                  per_device_train_batch_size=4 // accumulation)
    full = run(tmp_path / "full", **common)
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / f"checkpoint-{checkpoint}"), **common)
    assert_same(snapshot(full), snapshot(resumed))
    assert full.fishdip_model.refresh_count == 1 + (6 - 1) // update_every


def test_checkpoint_holds_the_state_and_no_temporary_file(tmp_path):
    run(tmp_path, steps=3, update_every=2)
    files = os.listdir(tmp_path / "checkpoint-3")
    assert STATE_NAME in files and "adapter_model.safetensors" in files
    assert not [f for f in files if f.startswith(".tmp-")]


def test_an_interrupted_save_leaves_the_previous_file(tmp_path, monkeypatch):
    model = fishdip_llama()
    save_training_state(model, str(tmp_path))
    before = (tmp_path / STATE_NAME).read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(model, str(tmp_path))
    assert (tmp_path / STATE_NAME).read_bytes() == before
    assert os.listdir(tmp_path) == [STATE_NAME]


def test_loading_onto_another_base_model_fails_and_changes_nothing(tmp_path):
    trainer = run(tmp_path, steps=3, update_every=2)
    other = fishdip_llama()
    with torch.no_grad():
        for param in other.base_model.model.parameters():
            param.add_(1.0)
    before = eligible_weights(other).clone()
    with pytest.raises(ValueError, match="not the same base model"):
        load_training_state(other, str(tmp_path / "checkpoint-3"))
    assert torch.equal(before, eligible_weights(other))
    assert not other.base_model.mask.any()
    assert trainer.fishdip_model.refresh_count == 2


def test_loading_onto_a_trained_model_puts_its_training_back_first(tmp_path):
    trainer = run(tmp_path, steps=5, update_every=2, save_steps=3)
    saved = torch.load(tmp_path / "checkpoint-3" / STATE_NAME, weights_only=True)
    load_training_state(trainer.model, str(tmp_path / "checkpoint-3"))
    fresh = fishdip_llama()
    load_training_state(fresh, str(tmp_path / "checkpoint-3"))
    assert torch.equal(eligible_weights(trainer.model), eligible_weights(fresh))
    assert torch.equal(trainer.fishdip_model.mask, fresh.base_model.mask)
    assert fresh.base_model.step_count == saved["adapters"]["default"]["progress"]["optimizer_steps"] == 3


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    args = dict(eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True, per_device_eval_batch_size=4)  # not the last
    model = fishdip_llama()
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, steps=6, save_strategy="steps", **args),
                             train_dataset=RowDataset(), eval_dataset=RowDataset(8))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    fresh = fishdip_llama()
    load_training_state(fresh, best)
    assert torch.equal(eligible_weights(model), eligible_weights(fresh))


def test_resuming_without_the_state_file_falls_back_to_the_adapter(tmp_path, caplog):
    run(tmp_path / "full", steps=3, update_every=2)
    os.remove(tmp_path / "full" / "checkpoint-3" / STATE_NAME)
    resumed = run(tmp_path / "resumed", steps=4, resume=str(tmp_path / "full" / "checkpoint-3"), update_every=2)
    assert "training does not resume exactly" in caplog.text
    assert resumed.fishdip_model.step_count == 1 and resumed.fishdip_model.refresh_count == 1


def test_pools_merge_when_the_number_of_processes_changes():
    sample = {"input_ids": torch.zeros(1, 2)}
    states = [
        {"entries": [(3.0, -1, sample), (1.0, -2, sample)], "seen": 2, "rng": (3, (0,) * 625, None)},
        {"entries": [(3.0, -1, sample), (2.0, -2, sample)], "seen": 2, "rng": (3, (1,) * 625, None)},
    ]
    merged = merge_pool_states(states, capacity=3)
    assert sorted(((k, a) for k, a, _ in merged["entries"]), reverse=True) == [(3.0, -1), (3.0, -2), (2.0, -3)]
    assert merged["seen"] == 4 and merged["rng"] == states[0]["rng"]


def test_resume_true_skips_a_checkpoint_an_interrupted_save_left_incomplete(tmp_path):
    run(tmp_path, steps=4, update_every=2, save_steps=2)
    broken = tmp_path / "checkpoint-6"
    broken.mkdir()
    (broken / STATE_NAME).write_bytes((tmp_path / "checkpoint-4" / STATE_NAME).read_bytes())  # killed after it
    from fishdip_peft.trainer import last_complete_checkpoint

    assert last_complete_checkpoint(str(tmp_path)).endswith("checkpoint-4")
    trainer = FishDipTrainer(model=fishdip_llama(update_every=2),
                             args=training_args(tmp_path, steps=4, save_strategy="no"), train_dataset=RowDataset())
    with pytest.raises(ValueError, match="checkpoint-6 is an incomplete checkpoint"):
        trainer.train(resume_from_checkpoint=str(broken))


def test_a_changed_num_regressing_is_refused_before_anything_changes(tmp_path):
    run(tmp_path, steps=3, update_every=2, save_steps=3)
    other = fishdip_llama(update_every=2, num_regressing=5)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="num_regressing=3.*num_regressing=5"):
        load_training_state(other, str(tmp_path / "checkpoint-3"))
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))

"""FishDipTrainer: re-scoring the training set for the Fisher samples, and optim="adafactor"."""

from __future__ import annotations

import pytest
import torch

from fishdip_peft import FishDipTrainer, SparseAdafactor
from fishdip_peft.losses import per_sample_losses_from_outputs
from tests.test_trainer import RowDataset, fishdip_llama, one_thread, training_args  # noqa: F401 (fixture)


class Spy:
    def __init__(self, tuner):
        self.rescored = []
        original = tuner.rescore

        def rescore(batches, losses_fn=None):
            count = original(batches, losses_fn)
            self.rescored.append((tuner.step_count, count, list(tuner.pool_losses())))
            return count

        tuner.rescore = rescore


@pytest.mark.parametrize(
    "size, update_every, expected",
    [(12, 10, True), (12, 2, False), (48, 40, True), (48, 39, False)],  # N <= 0.3 x m x 4 samples per step
)
def test_auto_rescoring_turns_on_for_small_training_sets(tmp_path, size, update_every, expected):
    model = fishdip_llama(update_every=update_every)
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, steps=1), train_dataset=RowDataset(size))
    assert trainer._fishdip_rescoring_on() is expected


def test_rescoring_scores_every_sample_with_the_current_weights_at_each_refresh(tmp_path):
    model = fishdip_llama(update_every=2, num_regressing=3)
    dataset = RowDataset(12)
    spy = Spy(model.base_model)
    trainer = FishDipTrainer(model=model, args=training_args(tmp_path, steps=5), train_dataset=dataset, rescore=True)
    trainer.train()
    assert [(step, count) for step, count, _ in spy.rescored] == [(0, 12), (2, 12), (4, 12)]
    # After training, a fresh re-score ranks the 12 samples by their current losses: the top 3 of those.
    rows = [dataset[i] for i in range(12)]
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        model.eval()
        expected = per_sample_losses_from_outputs(model, model(**batch), batch["labels"])
    model.base_model.rescore([batch])
    assert model.base_model.pool_losses() == pytest.approx(sorted(expected.tolist(), reverse=True)[:3])


def test_rescore_true_needs_a_sized_training_set(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(RowDataset(8).rows)

    trainer = FishDipTrainer(model=fishdip_llama(), args=training_args(tmp_path, steps=1), train_dataset=Stream(),
                             rescore=True)
    with pytest.raises(ValueError, match="rescore=True needs a training set with a length"):
        trainer.train()


def test_optim_adafactor_trains_with_sparse_adafactor(tmp_path):
    model = fishdip_llama(update_every=100)  # one mask: what changed must lie inside it
    args = training_args(tmp_path, steps=3, optim="adafactor", optim_args="scale_parameter=True", weight_decay=0.0)
    trainer = FishDipTrainer(model=model, args=args, train_dataset=RowDataset(12))
    before = torch.cat([p.detach().reshape(-1).clone() for _, p in model.base_model.eligible_parameters()])
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, SparseAdafactor)
    assert optimizer.defaults["scale_parameter"] is True and optimizer.defaults["relative_step"] is False
    after = torch.cat([p.detach().reshape(-1) for _, p in model.base_model.eligible_parameters()])
    changed = before != after
    assert changed.any() and not changed[~model.base_model.mask].any()


def test_optim_args_for_adafactor_are_checked(tmp_path):
    args = training_args(tmp_path, steps=1, optim="adafactor", optim_args="momentum=0.9")
    trainer = FishDipTrainer(model=fishdip_llama(), args=args, train_dataset=RowDataset(8))
    with pytest.raises(ValueError, match="optim_args item 'momentum=0.9'"):
        trainer.train()

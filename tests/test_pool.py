"""The regressing pool ranks distinct samples by their latest loss; re-scoring refills it."""

import torch
from peft import get_peft_model

from fishdip_peft import FishDipConfig, forward_with_per_sample_losses
from fishdip_peft.losses import per_sample_losses_from_outputs
from fishdip_peft.pool import RegressingPool, sample_identity, slice_sample
from tests.models import causal_batch, seq2seq_batch, tiny_llama


def _ids(samples):
    return [int(s["input_ids"][0, 0]) for s in samples]


def _batch(*ids):
    return {"input_ids": torch.tensor([[i, 1, 2] for i in ids]), "labels": torch.tensor([[i, 1, 2] for i in ids])}


def test_a_sample_seen_again_replaces_its_entry_with_its_latest_loss():
    pool = RegressingPool(2)
    pool.offer(torch.tensor([5.0, 4.0, 1.0]), _batch(10, 11, 12))
    pool.offer(torch.tensor([0.5]), _batch(10))  # sample 10 has learned: its old loss 5.0 is stale
    assert pool.losses() == [4.0, 0.5]
    pool.offer(torch.tensor([3.0, 2.0]), _batch(13, 11))  # 11 again, lower; 13 new
    assert _ids(pool.drain()) == [13, 11]


def test_one_sample_never_fills_two_slots():
    pool = RegressingPool(3)
    for loss in (1.0, 2.0, 3.0):
        pool.offer(torch.tensor([loss, 0.5]), _batch(7, 8))
    assert len(pool) == 2 and pool.losses() == [3.0, 0.5]


def test_ties_keep_the_earlier_arrival():
    pool = RegressingPool(2)
    pool.offer(torch.tensor([1.0, 1.0, 1.0]), _batch(1, 2, 3))
    assert _ids(pool.drain()) == [1, 2]


def test_sample_identity_ignores_padding_and_sees_content():
    batch = causal_batch(0, batch=4, length=12)  # right-padded rows of lengths 12, 11, 10, 9
    short = {k: v[3:4, :9] for k, v in batch.items()}
    assert sample_identity(slice_sample(batch, 3)) == sample_identity(short)
    left = {k: torch.cat([torch.zeros_like(v[3:4, :2]) - (100 if k == "labels" else 0), v[3:4, :9]], 1)
            for k, v in batch.items()}
    left["attention_mask"][0, :2] = 0
    assert sample_identity(left) == sample_identity(short)
    other = dict(short, labels=short["labels"].clone())
    other["labels"][0, -1] = 5
    assert sample_identity(other) != sample_identity(short)
    s2s = seq2seq_batch(0)  # row 0's labels end in two ignored positions
    trimmed = {k: (v[0:1, :-2] if k == "labels" else v[0:1]) for k, v in s2s.items()}
    assert sample_identity(slice_sample(s2s, 0)) == sample_identity(trimmed)


def test_pool_state_round_trips():
    pool = RegressingPool(2)
    pool.offer(torch.tensor([2.0, 1.0, 3.0]), _batch(1, 2, 3))
    copy = RegressingPool(2)
    copy.load_state_dict(pool.state_dict())
    copy.offer(torch.tensor([0.1]), _batch(3))  # identities survive the round trip
    assert _ids(copy.drain()) == [1, 3]


def test_rescoring_ranks_the_whole_training_set_by_current_losses():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    tuner = model.base_model
    data = [causal_batch(seed, batch=4) for seed in range(3)]
    with torch.no_grad():
        expected = torch.cat([per_sample_losses_from_outputs(model, model(**b), b["labels"]) for b in data])
    assert tuner.rescore(data) == 12
    assert tuner.pool_losses() == sorted(expected.tolist(), reverse=True)[:3]


def test_rescoring_and_a_refresh_give_each_module_back_its_own_training_flag():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    model.train()
    modules = list(model.modules())
    for module in modules[1::3]:  # a mix of training and eval modules, as a partly frozen model has
        module.eval()
    flags = [module.training for module in modules]
    batch = causal_batch(0, batch=2)
    model.base_model.rescore([batch])
    assert [module.training for module in modules] == flags
    assert model.base_model.refresh_mask()  # the Fisher pass over the rescored samples
    assert [module.training for module in modules] == flags


def test_with_rescoring_the_first_mask_and_every_refresh_use_the_rescored_samples():
    def mask_after(rescoring: bool):
        model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=2))
        tuner = model.base_model
        data = [causal_batch(seed, batch=4) for seed in range(3)]
        scored = []
        if rescoring:
            def source():
                scored.append(tuner.step_count)
                return data
            tuner.set_rescoring(source)
        optimizer = torch.optim.SGD([tuner.fishdip_state.values], lr=0.1)
        masks = []
        for step in range(5):
            batch = causal_batch(100 + step, batch=2)
            outputs, losses = forward_with_per_sample_losses(model, batch)
            model.step(losses, batch)
            outputs.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            masks.append(tuner.mask.clone())
        return masks, scored, tuner

    plain, _, _ = mask_after(False)
    rescored, scored_at, tuner = mask_after(True)
    assert scored_at == [0, 2, 4]  # optimizer steps taken: the first mask, then every refresh
    assert not torch.equal(plain[0], rescored[0])  # the first mask comes from the training set, not the batch
    assert tuner.refresh_count == 3

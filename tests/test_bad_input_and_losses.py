"""DESIGN invariant 8 (bad input never corrupts state) and the per-sample loss helpers."""

import pytest
import torch
from peft import get_peft_model

from fishdip_peft import FishDipConfig, forward_with_per_sample_losses, per_sample_losses
from tests.models import causal_batch, seq2seq_batch, tiny_llama, tiny_t5


def snapshot(model):
    tuner = model.base_model
    return (
        tuner.mask.clone(),
        tuner.fishdip_state.values.detach().clone(),
        [p.detach().clone() for _, p in tuner.eligible_parameters()],
        tuner.step_count,
        len(tuner.pool_losses()),
    )


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert a[3:] == b[3:]


@pytest.fixture
def model():
    """A model whose mask is built and whose next step() refreshes it."""
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=1, num_regressing=3))
    batch = causal_batch(0)
    _, losses = forward_with_per_sample_losses(model, batch)
    model.step(losses, batch)
    torch.optim.SGD([model.base_model.fishdip_state.values], lr=0.0).step()  # refreshes count optimizer steps
    return model


@pytest.mark.parametrize(
    "losses, message",
    [
        (torch.ones(4, 1), "1-D tensor"),
        (torch.tensor(1.0), "1-D tensor"),
        ([1.0, 2.0, 3.0, 4.0], "1-D tensor"),
        (torch.ones(3), "3 losses for a batch of 4"),
    ],
)
def test_wrong_losses_raise_and_change_nothing(model, losses, message):
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.step(losses, causal_batch(1))
    assert_same(before, snapshot(model))


def test_inconsistent_batch_raises(model):
    batch = causal_batch(1)
    batch["labels"] = batch["labels"][:2]
    before = snapshot(model)
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model.step(torch.ones(4), batch)
    assert_same(before, snapshot(model))


def test_non_finite_losses_are_not_pooled():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=5, num_regressing=3))
    model.step(torch.ones(4), causal_batch(0))
    losses = torch.tensor([float("nan"), 1.0, float("inf"), 2.0])
    with pytest.warns(UserWarning, match="2 non-finite per-sample losses"):
        model.step(losses, causal_batch(1))
    assert model.base_model.pool_losses() == [2.0, 1.0]


def test_refresh_with_only_non_finite_losses_is_skipped_and_keeps_the_mask(model):
    before = model.base_model.mask.clone()
    with pytest.warns(UserWarning) as record:
        changed = model.step(torch.full((4,), float("nan")), causal_batch(1))
    assert not changed and torch.equal(before, model.base_model.mask)
    assert any("mask is kept" in str(w.message) for w in record)


def test_non_finite_fisher_skips_the_refresh(model):
    before = model.base_model.mask.clone()
    batch = causal_batch(1)
    _, losses = forward_with_per_sample_losses(model, batch)
    with torch.no_grad():
        model.base_model.model.model.norm.weight[0] = float("inf")
    with pytest.warns(UserWarning, match="mask refresh skipped"):
        assert not model.step(losses, batch)
    assert torch.equal(before, model.base_model.mask)


def test_batch_without_labels_is_a_clear_error():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05))
    batch = causal_batch(0)
    with pytest.raises(ValueError, match="needs `labels`"):
        forward_with_per_sample_losses(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="needs `labels`"):
        model.step(torch.ones(4), {"input_ids": batch["input_ids"]})


def test_density_too_small_for_the_model():
    with pytest.raises(ValueError, match="keeps no entry"):
        get_peft_model(tiny_llama(), FishDipConfig(density=1e-9))


@pytest.mark.parametrize("factory, make_batch", [(tiny_llama, causal_batch), (tiny_t5, seq2seq_batch)])
def test_per_sample_losses_equal_the_models_loss_on_each_sample(factory, make_batch):
    model = factory()
    batch = make_batch(3)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    with torch.no_grad():
        assert torch.allclose(outputs.loss, model(**batch).loss, rtol=1e-5)
        for i in range(losses.numel()):
            single = {k: v[i : i + 1] for k, v in batch.items()}
            torch.testing.assert_close(losses[i], model(**single).loss, rtol=1e-5, atol=1e-6)


def test_per_sample_losses_ignore_the_ignore_index():
    logits = torch.zeros(2, 3, 5)
    logits[0, 0, 1] = 10.0
    labels = torch.tensor([[-100, 1, -100], [-100, -100, -100]])
    losses = per_sample_losses(logits, labels, causal=True)
    assert losses[0] < 1e-3 and losses[1] == 0.0
    with pytest.raises(ValueError, match="expected logits"):
        per_sample_losses(logits, labels[:, :2], causal=True)


def test_optimizer_step_without_any_mask_is_a_clear_error_that_changes_nothing():
    """A loop whose forwards carry no labels and that never calls step(): refused, not a silent no-op."""
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    forward_with_per_sample_losses(model, causal_batch(0))[0].loss.backward()
    with pytest.raises(RuntimeError, match="has no mask yet.*call model.step"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_only_causal_lms_shift_their_labels():
    from transformers import BertConfig, BertForMaskedLM

    from fishdip_peft.losses import is_causal_lm, per_sample_losses_from_outputs

    masked = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=32)).eval()
    assert is_causal_lm(tiny_llama()) and not is_causal_lm(tiny_t5()) and not is_causal_lm(masked)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    with torch.no_grad():
        outputs = masked(input_ids=ids, labels=labels)
    losses = per_sample_losses_from_outputs(masked, outputs, labels)  # the masked position itself, unshifted
    assert torch.allclose(losses.mean(), outputs.loss, rtol=1e-6)

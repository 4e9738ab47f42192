"""DESIGN invariants 1-4: frozen entries never move, exactly K selected, exact Fisher, O(K) optimizer state."""

import pytest
import torch
from peft import get_peft_model
from transformers.optimization import Adafactor

from fishdip_peft import FishDipConfig, forward_with_per_sample_losses
from fishdip_peft.fisher import empirical_fisher
from tests.models import causal_batch, seq2seq_batch, tiny_llama, tiny_t5

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adafactor": lambda params: Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False),
}


def flat_weights(model):
    return torch.cat([p.detach().reshape(-1).clone() for _, p in model.base_model.eligible_parameters()])


def train(model, optimizer, steps, make_batch=causal_batch, step_before_backward=True):
    """Train `steps` optimizer steps; return per-step (mask, weights before, weights after)."""
    history = []
    for i in range(steps):
        batch = make_batch(i)
        outputs, losses = forward_with_per_sample_losses(model, batch)
        if step_before_backward:
            model.step(losses, batch)
            outputs.loss.backward()
        else:
            outputs.loss.backward()
            model.step(losses, batch)
        before = flat_weights(model)
        optimizer.step()
        optimizer.zero_grad()
        history.append((model.base_model.mask.clone(), before, flat_weights(model)))
    return history


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_entries_outside_the_mask_never_move(name):
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])
    for mask, before, after in train(model, optimizer, steps=5):
        assert torch.equal(before[~mask], after[~mask])
        assert (before[mask] != after[mask]).any()


def test_every_refresh_selects_exactly_k_in_a_flat_bool_mask():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    total = sum(p.numel() for _, p in model.base_model.eligible_parameters())
    masks = [mask for mask, _, _ in train(model, optimizer, steps=6)]
    for mask in masks:
        assert mask.dtype == torch.bool and mask.shape == (total,)
        assert int(mask.sum()) == model.base_model.num_trainable == round(0.05 * total)
    assert model.base_model.refresh_count == 3
    assert not torch.equal(masks[0], masks[-1])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_is_of_size_k(name):
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 1 and params[0].numel() == model.base_model.num_trainable
    optimizer = OPTIMIZERS[name](params)
    train(model, optimizer, steps=3)
    total = model.base_model.mask.numel()
    for state in optimizer.state.values():
        for tensor in state.values():
            if isinstance(tensor, torch.Tensor):
                assert tensor.numel() <= model.base_model.num_trainable < total


def brute_force_fisher(model, samples):
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    total = [torch.zeros_like(p) for p in params]
    for sample in samples:
        grads = torch.autograd.grad(model(**sample).loss, params, allow_unused=True)
        for t, g in zip(total, grads):
            if g is not None:
                t += g * g
    return [t / len(samples) for t in total]


@pytest.mark.parametrize("factory, make_batch", [(tiny_llama, causal_batch), (tiny_t5, seq2seq_batch)])
def test_fisher_equals_a_brute_force_per_sample_loop(factory, make_batch):
    model = factory()
    batch = make_batch(0)
    samples = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    params = list(model.parameters())
    params[0].requires_grad_(False)
    model.train()
    scores = empirical_fisher(model, samples, params)
    assert model.training and all(m.training for m in model.modules())
    assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])
    assert all(p.grad is None for p in params)
    reference = brute_force_fisher(factory().eval(), samples)
    for s, r in zip(scores, reference):
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("factory, make_batch", [(tiny_llama, causal_batch), (tiny_t5, seq2seq_batch)])
def test_values_gradient_is_the_dense_gradient_at_the_mask(factory, make_batch):
    model = get_peft_model(factory(), FishDipConfig(density=0.1, num_regressing=2))
    batch = make_batch(1)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    model.step(losses, batch)
    outputs.loss.backward()
    dense_model = factory()
    dense_loss, _ = forward_with_per_sample_losses(dense_model, batch)
    dense_loss.loss.backward()
    grads = {n: p.grad for n, p in dense_model.named_parameters()}
    dense = torch.cat([grads[n].reshape(-1) for n, _ in model.base_model.eligible_parameters()])
    mask = model.base_model.mask
    values = model.base_model.fishdip_state.values
    torch.testing.assert_close(values.grad, dense[mask], rtol=1e-5, atol=1e-7)


def refresh_step_gradient(step_before_backward):
    """values.grad and selection on the third step (a refresh) of a fresh model."""
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, optimizer, steps=2)
    old_flat = model.base_model.fishdip_state.flat_selection()
    batch = causal_batch(2)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    if step_before_backward:
        assert model.step(losses, batch)
    outputs.loss.backward()
    if not step_before_backward:
        assert model.step(losses, batch)
    state = model.base_model.fishdip_state
    return old_flat, state.flat_selection(), state.values.grad.clone()


def test_step_between_forward_and_backward_applies_the_new_mask_to_this_update():
    _, new_flat, grad_before = refresh_step_gradient(step_before_backward=True)
    old_flat, same_flat, grad_after = refresh_step_gradient(step_before_backward=False)
    assert torch.equal(new_flat, same_flat)
    is_new = ~torch.isin(new_flat, old_flat)
    assert is_new.any() and grad_before[is_new].abs().sum() > 0
    # After backward, the gradients of entries new to the mask were not kept: they train from the next step.
    assert not grad_after[is_new].any()
    torch.testing.assert_close(grad_after[~is_new], grad_before[~is_new], rtol=1e-6, atol=0)


def test_fixed_mask_is_built_once_and_kept():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=1, num_regressing=3, dynamic=False))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    masks = [mask for mask, _, _ in train(model, optimizer, steps=4)]
    assert all(torch.equal(masks[0], m) for m in masks)
    assert model.base_model.refresh_count == 1


def test_optimizer_moments_follow_entries_that_stay():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    values = model.base_model.fishdip_state.values
    optimizer = torch.optim.AdamW([values], lr=1e-2)
    train(model, optimizer, steps=2)
    old_flat = model.base_model.fishdip_state.flat_selection()
    old_moment = optimizer.state[values]["exp_avg"].clone()
    batch = causal_batch(7)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    assert model.step(losses, batch)
    new_flat = model.base_model.fishdip_state.flat_selection()
    moment = optimizer.state[values]["exp_avg"]
    position = {int(f): i for i, f in enumerate(old_flat)}
    stays = [i for i, f in enumerate(new_flat.tolist()) if f in position]
    leaves_new = [i for i, f in enumerate(new_flat.tolist()) if f not in position]
    assert stays and leaves_new
    assert torch.equal(moment[stays], old_moment[[position[int(new_flat[i])] for i in stays]])
    assert not moment[leaves_new].any()


def test_bf16_weights_keep_float32_trainable_values():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), FishDipConfig(density=0.05, num_regressing=2))
    values = model.base_model.fishdip_state.values
    assert values.dtype == torch.float32
    optimizer = torch.optim.SGD([values], lr=1e-4)
    train(model, optimizer, steps=1)
    weights = torch.cat([p.detach().reshape(-1) for _, p in model.base_model.eligible_parameters()])
    assert torch.equal(weights[model.base_model.mask], values.detach().to(torch.bfloat16))
    assert not torch.equal(values.detach(), values.detach().to(torch.bfloat16).float())


def test_regressing_pool_keeps_the_highest_losses_across_batches():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=3, num_regressing=2))
    optimizer = torch.optim.SGD([model.base_model.fishdip_state.values], lr=0.0)
    train(model, optimizer, steps=1)
    seen = []
    for i in range(1, 3):
        batch = causal_batch(10 + i)
        _, losses = forward_with_per_sample_losses(model, batch)
        model.step(losses, batch)
        seen += losses.tolist()
    assert model.base_model.pool_losses() == sorted(seen, reverse=True)[:2]


def test_sample_unaware_pool_ignores_the_loss():
    from fishdip_peft.pool import RegressingPool

    batch = {"input_ids": torch.arange(200).view(200, 1)}
    losses = torch.arange(200, dtype=torch.float32)
    aware, unaware = RegressingPool(5, True, seed=0), RegressingPool(5, False, seed=0)
    aware.offer(losses, batch)
    unaware.offer(losses, batch)
    assert sorted(int(s["input_ids"]) for s in aware.drain()) == [195, 196, 197, 198, 199]
    picked = sorted(int(s["input_ids"]) for s in unaware.drain())
    assert len(picked) == 5 and picked != [195, 196, 197, 198, 199]

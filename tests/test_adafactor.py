"""SparseAdafactor equals transformers.Adafactor run on dense gradients zeroed outside the mask."""

import copy

import pytest
import torch
from peft import get_peft_model
from transformers.optimization import Adafactor

from fishdip_peft import FishDipConfig, SparseAdafactor, forward_with_per_sample_losses
from tests.models import causal_batch, seq2seq_batch, tiny_llama, tiny_t5

SETTINGS = {
    "authors": dict(lr=1e-2, scale_parameter=True, relative_step=False, warmup_init=False),
    "transformers-defaults": dict(),
    "warmup-init": dict(relative_step=True, warmup_init=True),
    "no-parameter-scale": dict(lr=3e-3, scale_parameter=False, relative_step=False),
}
MODELS = {"llama": (tiny_llama, causal_batch), "t5": (tiny_t5, seq2seq_batch)}


def _dense_masked_gradients(params, mask, values_grad):
    flat = torch.zeros(mask.numel())
    flat[mask] = values_grad
    offset = 0
    for param in params:
        param.grad = flat[offset : offset + param.numel()].view_as(param).clone()
        offset += param.numel()


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("arch", MODELS)
def test_sparse_adafactor_equals_dense_adafactor_on_masked_gradients(arch, setting):
    make_model, make_batch = MODELS[arch]
    base = make_model()
    dense = copy.deepcopy(base)
    model = get_peft_model(base, FishDipConfig(density=0.2, update_every=2, num_regressing=3))
    tuner = model.base_model
    optimizer = SparseAdafactor(model, **SETTINGS[setting])
    names = [name for name, _ in tuner.eligible_parameters()]
    dense_params = dict(dense.named_parameters())
    reference = Adafactor([dense_params[n] for n in names], **SETTINGS[setting])
    masks = set()
    for step in range(7):
        batch = make_batch(step)
        outputs, losses = forward_with_per_sample_losses(model, batch)
        model.step(losses, batch)
        outputs.loss.backward()
        values_grad = tuner.fishdip_state.values.grad.clone()
        optimizer.step()
        optimizer.zero_grad()
        # The same gradient, dense, zero outside the mask: this isolates the optimizer from the
        # rounding of the two ways of computing the gradient.
        _dense_masked_gradients([dense_params[n] for n in names], tuner.mask, values_grad)
        reference.step()
        reference.zero_grad()
        masks.add(tuple(torch.nonzero(tuner.mask).flatten().tolist()))
        for name, weight in tuner.eligible_parameters():
            expected = dense_params[name]
            torch.testing.assert_close(weight, expected, rtol=1e-6, atol=1e-6 * float(expected.detach().abs().max()))
    assert tuner.refresh_count == 4 and len(masks) > 1  # several masks, each applied to both


def test_sparse_adafactor_state_is_per_tensor_and_survives_refreshes():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.1, update_every=1, num_regressing=2))
    tuner = model.base_model
    optimizer = SparseAdafactor(model, lr=1e-2, relative_step=False)
    frozen_before = None
    for step in range(3):
        batch = causal_batch(step)
        outputs, losses = forward_with_per_sample_losses(model, batch)
        model.step(losses, batch)
        outputs.loss.backward()
        mask = tuner.mask.clone()
        frozen_before = torch.cat([p.detach().reshape(-1) for _, p in tuner.eligible_parameters()])[~mask]
        row = optimizer.state[tuner.fishdip_state.values].get("exp_avg_sq_row")
        row_before = None if row is None else row.clone()
        optimizer.step()
        optimizer.zero_grad()
        after = torch.cat([p.detach().reshape(-1) for _, p in tuner.eligible_parameters()])
        assert torch.equal(after[~mask], frozen_before)  # entries outside the mask never move
        if row_before is not None:  # the refresh at this step left the per-tensor statistics alone
            assert row_before.shape == optimizer.state[tuner.fishdip_state.values]["exp_avg_sq_row"].shape
    state = optimizer.state[tuner.fishdip_state.values]
    slots = tuner.fishdip_state.slots
    rows = sum(s.param.shape[0] for s in slots if s.param.dim() == 2)
    cols = sum(s.param.shape[1] for s in slots if s.param.dim() == 2)
    vectors = sum(s.param.numel() for s in slots if s.param.dim() == 1)
    assert state["exp_avg_sq_row"].numel() == rows and state["exp_avg_sq_col"].numel() == cols
    assert state["exp_avg_sq"].numel() == vectors


def test_sparse_adafactor_refuses_a_first_moment():
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.1))
    with pytest.raises(ValueError, match="beta1"):
        SparseAdafactor(model, lr=1e-2, relative_step=False, beta1=0.9)
    with pytest.raises(ValueError, match="relative_step"):
        SparseAdafactor(model, lr=1e-2)

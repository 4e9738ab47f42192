"""Nothing lost and nothing half-applied: refreshes while disabled, skipped or failing refreshes,
module-prefix targets, step() called twice."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model

from fishdip_peft import FishDipConfig, forward_with_per_sample_losses
from tests.models import causal_batch, tiny_llama, train_automatically

CONFIG = dict(density=0.05, update_every=1, num_regressing=3)


def trained(steps=2, **config):
    model = get_peft_model(tiny_llama(), FishDipConfig(**{**CONFIG, **config}))
    return model, train_automatically(model, steps)


def weights(model):
    return torch.cat([p.detach().reshape(-1).clone() for _, p in model.base_model.eligible_parameters()])


def test_a_refresh_while_disabled_is_refused_and_loses_nothing():
    model, _ = trained()
    before, mask = weights(model), model.base_model.mask.clone()
    batch = causal_batch(5)
    _, losses = forward_with_per_sample_losses(model, batch)
    with model.disable_adapter():
        with pytest.raises(RuntimeError, match="disabled"):
            model.base_model.step(losses, batch)
    assert torch.equal(weights(model), before) and torch.equal(model.base_model.mask, mask)
    assert model.base_model.pool_losses() == []  # nothing was pooled by the refused call


def test_a_skipped_first_refresh_is_retried_and_never_leaves_the_model_untrainable():
    model = get_peft_model(tiny_llama(), FishDipConfig(**CONFIG))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = causal_batch(0)
    batch["labels"][:] = -100  # no target token: loss NaN, nothing to pool
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**batch).loss.backward()
        optimizer.step()  # no mask yet: trains nothing, with a warning, instead of crashing
    optimizer.zero_grad()
    assert model.base_model.refresh_count == 0
    before = weights(model)
    model(**causal_batch(1)).loss.backward()
    optimizer.step()
    assert model.base_model.refresh_count == 1 and not torch.equal(weights(model), before)


def test_a_failing_refresh_keeps_the_pool_and_the_counters(monkeypatch):
    model, _ = trained()
    tuner = model.base_model
    batch = causal_batch(7)
    _, losses = forward_with_per_sample_losses(model, batch)
    tuner.offer(losses, batch)
    pooled, counters = tuner.pool_losses(), (tuner.step_count, tuner.refresh_count)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr("fishdip_peft.stepping.empirical_fisher", fail)
    with pytest.raises(RuntimeError, match="injected"):
        tuner.refresh_mask()
    assert tuner.pool_losses() == pooled and (tuner.step_count, tuner.refresh_count) == counters


def test_step_twice_in_one_optimizer_step_refreshes_once():
    model, optimizer = trained(steps=1)
    tuner = model.base_model
    refreshes = tuner.refresh_count
    for seed in (10, 11):
        batch = causal_batch(seed)
        _, losses = forward_with_per_sample_losses(model, batch)
        model.base_model.step(losses, batch)
    assert tuner.refresh_count == refreshes + 1


@pytest.mark.parametrize("targets, expected", [
    (["layers.0"], lambda n: ".layers.0." in n),
    (["self_attn"], lambda n: ".self_attn." in n),
    (["q_proj"], lambda n: ".q_proj." in n),
])
def test_target_modules_match_module_prefixes_and_components(targets, expected):
    model = get_peft_model(tiny_llama(), FishDipConfig(target_modules=targets, density=0.1))
    names = [name for name, _ in model.base_model.eligible_parameters()]
    assert names and all(expected(name) for name in names)
    everything = [n for n, _ in tiny_llama().named_parameters()]
    assert sorted(names) == sorted(n for n in everything if expected(n))


def test_a_temporary_name_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    import os
    import subprocess
    import sys

    from fishdip_peft.atomic import atomic_write, write_bytes

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{int(dead.stdout)}-0123abcd.safetensors"
    live = tmp_path / f".tmp-{os.getpid()}-4567ef.safetensors"  # a write of this very process, in flight
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    atomic_write(str(tmp_path / "adapter_model.safetensors"), lambda tmp: write_bytes(tmp, b"whole"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter_model.safetensors", live.name])
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == b"whole"


@pytest.mark.parametrize("edit, message", [
    (lambda labels: labels.float(), "integer ids"),
    (lambda labels: labels.masked_fill(labels == labels.max(), -5), r"\[0, 64\)"),
    (lambda labels: labels.masked_fill(labels == labels.max(), 64), r"\[0, 64\)"),
])
def test_bad_labels_are_refused_when_offered_not_steps_later(edit, message):
    model, _ = trained(steps=1)
    batch = causal_batch(3)
    pooled = model.base_model.pool_losses()
    batch["labels"] = edit(batch["labels"])
    with pytest.raises(ValueError, match=message):
        model.base_model.step(torch.ones(4), batch)
    assert model.base_model.pool_losses() == pooled

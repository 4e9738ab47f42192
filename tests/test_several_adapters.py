"""Several FISH-DIP adapters on one model, the peft way."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from fishdip_peft import FishDipConfig
from tests.models import causal_batch, tiny_llama

CONFIG = dict(density=0.05, update_every=2, num_regressing=3)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def train(model, steps, offset=0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        model(**causal_batch(offset + step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two adapters trained on different data, saved to their own folders, and the logits of each one
    loaded alone."""
    folders, outputs = {}, {}
    for name, offset in (("a", 0), ("b", 100)):
        model = get_peft_model(tiny_llama(), FishDipConfig(seed=offset, **CONFIG))
        train(model, 3, offset)
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        outputs[name] = logits(PeftModel.from_pretrained(tiny_llama(), folders[name]), causal_batch(7))
    return folders, outputs


def two_adapters(saved):
    folders, _ = saved
    model = PeftModel.from_pretrained(tiny_llama(), folders["a"], adapter_name="a")
    model.load_adapter(folders["b"], adapter_name="b")
    return model


def test_switching_adapters_gives_each_ones_logits_bit_for_bit(saved):
    _, outputs = saved
    model = two_adapters(saved)
    batch = causal_batch(7)
    assert torch.equal(logits(model, batch), outputs["a"])  # loading b left a active and untouched
    model.set_adapter("b")
    assert torch.equal(logits(model, batch), outputs["b"])
    model.set_adapter("a")
    assert torch.equal(logits(model, batch), outputs["a"])
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(tiny_llama(), batch))
    assert torch.equal(logits(model, batch), outputs["a"])


def test_training_one_adapter_leaves_the_other_untouched(saved):
    _, outputs = saved
    model = two_adapters(saved)
    model.set_adapter("b")  # trainable again after set_adapter
    train(model, 2, offset=50)
    assert model.base_model.progress["a"].optimizer_steps == 0
    assert model.base_model.progress["b"].optimizer_steps == 2
    model.set_adapter("a")
    assert torch.equal(logits(model, causal_batch(7)), outputs["a"])


def test_delete_adapter(saved):
    _, outputs = saved
    model = two_adapters(saved)
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"] and model.active_adapters == ["b"]
    assert torch.equal(logits(model, causal_batch(7)), outputs["b"])
    model.delete_adapter("b")  # the last one: the base model's weights are back
    assert torch.equal(logits(model.base_model.model, causal_batch(7)), logits(tiny_llama(), causal_batch(7)))


def test_weighted_combination_saves_and_reloads_like_any_adapter(saved, tmp_path):
    model = two_adapters(saved)
    model.base_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab")
    model.set_adapter("ab")
    combined = logits(model, causal_batch(7))
    # the combination's deltas are the weighted sum of the two adapters' deltas
    base = dict(tiny_llama().named_parameters())
    weights = {}
    for name in ("a", "b", "ab"):
        model.set_adapter(name)
        weights[name] = {n: p.detach().clone() for n, p in model.base_model.eligible_parameters()}
    for n, w in weights["ab"].items():
        expected = base[n] + 0.5 * (weights["a"][n] - base[n]) + 0.5 * (weights["b"][n] - base[n])
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path, selected_adapters=["ab"])
    folder = tmp_path / "ab"
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder)
    torch.testing.assert_close(logits(reloaded, causal_batch(7)), combined, rtol=0, atol=1e-5)


def test_several_active_adapters_sum_their_deltas_and_switch_back_exactly(saved):
    model = two_adapters(saved)
    base = {n: p.detach().clone() for n, p in tiny_llama().named_parameters()}
    weights = {}
    for name in ("a", "b"):
        model.set_adapter(name)
        weights[name] = {n: p.detach().clone() for n, p in model.base_model.eligible_parameters()}
    model.base_model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    current = dict(model.base_model.model.named_parameters())
    for n, w in weights["a"].items():  # base + delta_a + delta_b, summed in float32
        expected = base[n] + (w - base[n]) + (weights["b"][n] - base[n])
        torch.testing.assert_close(current[n].detach(), expected, rtol=0, atol=1e-6)
    combined = logits(model, causal_batch(7))
    assert not torch.allclose(combined, saved[1]["a"], atol=1e-5)
    assert not torch.allclose(combined, saved[1]["b"], atol=1e-5)
    with model.disable_adapter():  # the base model, bit for bit
        assert all(torch.equal(p, base[n]) for n, p in model.base_model.model.named_parameters())
    assert torch.equal(logits(model, causal_batch(7)), combined)
    model.set_adapter("a")  # back to one adapter: exactly its weights
    assert torch.equal(logits(model, causal_batch(7)), saved[1]["a"])
    model.base_model.set_adapter(["a", "b"])
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, causal_batch(7)), combined, rtol=0, atol=0)


def test_several_active_adapters_do_not_train(saved):
    model = two_adapters(saved)
    model.base_model.set_adapter(["a", "b"])
    values = [model.base_model.fishdip_values[n] for n in ("a", "b")]
    optimizer = torch.optim.AdamW(values, lr=1e-2)
    with pytest.raises(RuntimeError, match="trains one adapter at a time"):
        optimizer.step()
    with pytest.raises(ValueError, match="unknown adapter"):
        model.base_model.set_adapter(["a", "c"])
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("c")


def test_deleting_one_of_two_active_adapters_leaves_the_other(saved):
    model = two_adapters(saved)
    model.base_model.set_adapter(["a", "b"])
    model.delete_adapter("b")
    assert model.active_adapters == ["a"]
    assert torch.equal(logits(model, causal_batch(7)), saved[1]["a"])


def test_merges_accumulate_and_peft_layer_level_activation_reaches_the_tuner(saved):
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = two_adapters(saved)
    model.base_model.set_adapter(["a", "b"])
    combined = logits(model, causal_batch(7))
    model.set_adapter("a")
    for module in model.modules():  # what peft's tests do to activate several adapters
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(["a", "b"])
    assert model.active_adapters == ["a", "b"]
    assert torch.equal(logits(model, causal_batch(7)), combined)
    model.set_adapter("a")
    model.merge_adapter(["a"])
    model.merge_adapter(["b"])  # sequential merges add up, like one merge of both
    assert model.base_model.merged_adapters == ["a", "b"]
    assert torch.equal(logits(model, causal_batch(7)), combined)


def test_modules_to_save_of_a_custom_model_are_wrapped_trained_and_saved(tmp_path):
    config = FishDipConfig(target_modules=["layers.0"], modules_to_save=["layers.1.mlp.down_proj"], **CONFIG)
    model = get_peft_model(tiny_llama(), config)
    wrapper = model.base_model.model.model.layers[1].mlp.down_proj
    assert type(wrapper).__name__ == "ModulesToSaveWrapper"
    assert all(p.requires_grad for p in wrapper.modules_to_save["default"].parameters())
    assert not any("modules_to_save" in name for name, _ in model.base_model.eligible_parameters())
    train(model, 3)
    expected = logits(model, causal_batch(7))
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(reloaded, causal_batch(7)), expected, rtol=0, atol=1e-6)
    model.add_adapter("other", FishDipConfig(target_modules=["layers.0"], modules_to_save=["layers.1.mlp.down_proj"],
                                             **CONFIG))
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        model.base_model.set_adapter(["default", "other"])

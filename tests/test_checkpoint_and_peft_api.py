"""DESIGN invariants 5-7: sparse-delta checkpoints, wrong-base refusal, disable/unload/merge."""

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import LlamaForCausalLM, PreTrainedModel

from fishdip_peft import FishDipConfig
from tests.models import (
    causal_batch,
    seq2seq_batch,
    tiny_bert_classifier,
    tiny_llama,
    tiny_t5,
)
from tests.test_training_invariants import train

FACTORIES = {"llama": (tiny_llama, causal_batch), "t5": (tiny_t5, seq2seq_batch)}


def trained(factory, make_batch, steps=4, **config):
    config = {"density": 0.05, "update_every": 2, "num_regressing": 3, **config}
    model = get_peft_model(factory(), FishDipConfig(**config))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train(model, optimizer, steps=steps, make_batch=make_batch)
    return model


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, labels=batch["labels"]).logits


def changed_entries(model, factory):
    base = dict(factory().named_parameters())
    return sum(int((p != base[n]).sum()) for n, p in model.base_model.eligible_parameters())


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_save_and_load_reproduce_the_trained_model(arch, tmp_path):
    factory, make_batch = FACTORIES[arch]
    model = trained(factory, make_batch)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    batch = make_batch(99)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_file_holds_only_sparse_entries_of_changed_weights(tmp_path):
    model = trained(tiny_llama, causal_batch)
    model.save_pretrained(tmp_path)
    changed = changed_entries(model, tiny_llama)
    eligible = dict(model.base_model.eligible_parameters())
    stored = 0
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            if key == "base_model.model.fishdip_manifest":  # SHA-256 of the other tensors
                assert f.get_tensor(key).numel() == 32
                continue
            if key == "base_model.model.fishdip_config":  # the saving config, JSON
                assert json.loads(bytes(f.get_tensor(key).tolist()))["density"] == 0.05
                continue
            name, _, field = key.rpartition(".")
            assert name.startswith("base_model.model.") and field.startswith("fishdip_")
            tensor = f.get_tensor(key)
            weight = eligible[name.removeprefix("base_model.model.")]
            if field == "fishdip_indices":
                assert tensor.dtype == torch.int32
                assert torch.all(tensor[1:] > tensor[:-1])
                stored += tensor.numel()
            assert tensor.numel() < weight.numel() or weight.numel() <= 32
    assert stored == changed > 0
    assert stored <= model.base_model.mask.numel() * 0.5


def test_payload_is_eight_bytes_per_changed_entry(tmp_path):
    model = trained(tiny_llama, causal_batch, steps=2, update_every=100, density=0.5)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    payload = os.path.getsize(path) - 8 - header_length
    tensors = _tensors(path)
    shapes = {k: t.numel() for k, t in tensors.items() if k.endswith("fishdip_shape")}
    per_tensor = sum(32 + 8 * ndim for ndim in shapes.values()) + 32  # fingerprint + shape, and the manifest
    per_tensor += tensors["base_model.model.fishdip_config"].numel()  # the config, a few hundred bytes
    flags = sum(t.numel() for k, t in tensors.items() if k.endswith("fishdip_selected"))  # 1 bit per entry
    changed = changed_entries(model, tiny_llama)
    assert flags == sum(-(-t.numel() // 8) for k, t in tensors.items() if k.endswith("fishdip_indices"))
    assert payload == 8 * changed + flags + per_tensor
    assert payload / changed < 8.5


def _tensors(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_bfloat16_deltas_halve_the_values(tmp_path):
    model = trained(tiny_llama, causal_batch, delta_dtype="bfloat16")
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("fishdip_deltas")}
    assert dtypes == {torch.bfloat16}
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    batch = causal_batch(5)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=2e-2, rtol=0)


def assert_load_refused_and_nothing_changed(other, adapter_dir, match):
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(other, adapter_dir)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())


def test_loading_onto_a_different_base_fails_and_changes_nothing(tmp_path):
    trained(tiny_llama, causal_batch).save_pretrained(tmp_path)
    assert_load_refused_and_nothing_changed(tiny_llama(seed=1), tmp_path, "differ from those the adapter was trained on")


def test_loading_onto_a_base_of_another_shape_fails_and_changes_nothing(tmp_path):
    trained(tiny_llama, causal_batch).save_pretrained(tmp_path)
    config = tiny_llama().config
    config.vocab_size = 72
    assert_load_refused_and_nothing_changed(LlamaForCausalLM(config), tmp_path, "different base model")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = trained(tiny_llama, causal_batch)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    original = path.read_bytes()

    def crash(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr("fishdip_peft.formats.write_bytes", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert path.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_disable_adapter_gives_the_base_outputs_exactly():
    model = trained(tiny_llama, causal_batch)
    batch = causal_batch(3)
    trained_logits = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(tiny_llama(), batch))
    assert torch.equal(logits(model, batch), trained_logits)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_unload_restores_the_base_weights_bit_for_bit(arch):
    factory, make_batch = FACTORIES[arch]
    model = trained(factory, make_batch)
    base = model.unload()
    assert type(base) is type(factory())
    reference = factory().state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in base.state_dict().items())
    assert not any(p.requires_grad for p in base.parameters())  # as peft's methods leave the base model


def test_merge_and_unload_returns_a_plain_model_computing_the_trained_outputs():
    model = trained(tiny_llama, causal_batch)
    batch = causal_batch(3)
    expected = logits(model, batch)
    merged = model.merge_and_unload()
    assert isinstance(merged, PreTrainedModel) and not hasattr(merged, "peft_config")
    assert torch.equal(logits(merged, batch), expected)
    assert not any(p.requires_grad for p in merged.parameters())  # as peft's methods leave it
    merged.requires_grad_(True)
    outputs = merged(**causal_batch(4))
    outputs.loss.backward()  # no FISH-DIP hook is left behind
    assert merged.model.embed_tokens.weight.grad is not None


def test_print_trainable_parameters_reports_k(capsys):
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05))
    model.print_trainable_parameters()
    k = model.base_model.num_trainable
    assert f"trainable params: {k:,}" in capsys.readouterr().out


def test_trainable_load_continues_training(tmp_path):
    model = trained(tiny_llama, causal_batch)
    model.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    values = resumed.base_model.fishdip_state.values
    assert values.requires_grad
    optimizer = torch.optim.AdamW([values], lr=1e-2)
    train(resumed, optimizer, steps=2)
    resumed.save_pretrained(tmp_path / "again")
    # Deltas stay relative to the original base, so the new file loads onto a fresh base.
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again")
    batch = causal_batch(8)
    torch.testing.assert_close(logits(again, batch), logits(resumed, batch), atol=1e-5, rtol=0)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["peft_type"] == "FISHDIP"


@pytest.mark.parametrize(
    "task_type, arch, wrapper",
    [("CAUSAL_LM", "llama", "PeftModelForCausalLM"), ("SEQ_2_SEQ_LM", "t5", "PeftModelForSeq2SeqLM")],
)
def test_task_type_gives_peft_task_model_whose_generation_survives_a_round_trip(task_type, arch, wrapper, tmp_path):
    factory, make_batch = FACTORIES[arch]
    model = trained(factory, make_batch, task_type=task_type)
    assert type(model).__name__ == wrapper
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(factory(), tmp_path)
    assert type(loaded).__name__ == wrapper
    batch = make_batch(5)
    prompt = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(loaded.generate(**prompt, **settings), model.generate(**prompt, **settings))


def test_encoder_classifier_trains_a_dense_head_beside_the_sparse_body_and_round_trips(tmp_path):
    # As with peft's other methods, SEQ_CLS models get a dense trainable copy of the new head
    # (`modules_to_save`), saved beside the sparse deltas of the body.
    base = tiny_bert_classifier()
    model = get_peft_model(base, FishDipConfig(task_type="SEQ_CLS", density=0.05, num_regressing=2))
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.fishdip_layer.fishdip_values.default" in trainable
    assert {n for n in trainable if "classifier" in n} == {
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias"}
    assert not any("classifier" in s.name for s in model.base_model.fishdip_state.slots)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1, 64, (4, 8), generator=g), "labels": torch.tensor([0, 1, 2, 1])}
    body = [p.detach().clone() for _, p in model.base_model.eligible_parameters()]
    model.train()
    model(**batch).loss.backward()  # automatic mode: per-sample cross-entropy from the forward
    optimizer.step()
    assert any(not torch.equal(a, p) for a, (_, p) in zip(body, model.base_model.eligible_parameters()))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {k.rsplit(".", 1)[1] for k in keys if "fishdip_" in k} == {
        "fishdip_deltas", "fishdip_indices", "fishdip_selected", "fishdip_shape", "fishdip_fingerprint",
        "fishdip_manifest", "fishdip_config"}
    assert {k for k in keys if "classifier" in k} == {"base_model.model.classifier.weight",
                                                      "base_model.model.classifier.bias"}
    model.eval()
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)



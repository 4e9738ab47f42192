"""Each method trains exactly the parameters it claims, on tiny random Llama and T5 models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from benchmarks.methods import BASELINES, CONLL04_METHODS, FISHDIP_METHODS, METHODS, build_method, count_trainable

VOCAB = 128
OVERRIDES = {"compacter": {"reduction_factor": 8}}
TRAINABLE_MARKER = {
    "lora": "lora_",
    "ia3": "ia3_l",
    "prefix-tuning": "prompt_encoder",
    "houlsby": ".adapters.houlsby.",
    "compacter": "compacter",
}


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, pad_token_id=0))


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=2,
                                               num_heads=4, d_kv=8, decoder_start_token_id=0))


MODELS = {"llama": tiny_llama, "t5": tiny_t5}
NEEDS_ADAPTERS = pytest.mark.skipif(importlib.util.find_spec("adapters") is None,
                                    reason="AdapterHub `adapters` is not installed")


def method_params(names) -> list:
    return [pytest.param(n, marks=NEEDS_ADAPTERS) if METHODS[n].checkpoint == "adapterhub" else n
            for n in names]


def train_step(model: torch.nn.Module) -> float:
    """Two AdamW steps, so zero-initialised halves of adapters also receive gradient."""
    torch.manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 8))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    optimizer.step()
    optimizer.zero_grad()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    optimizer.step()
    return loss.item()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("method", method_params([m for m in BASELINES if m in CONLL04_METHODS]))
def test_baseline_trains_only_its_parameters(method: str, arch: str) -> None:
    prepared = build_method(method, MODELS[arch](), **OVERRIDES.get(method, {}))
    model = prepared.model
    assert prepared.name == method
    assert prepared.trainable_params == count_trainable(model) > 0

    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert torch.isfinite(torch.tensor(train_step(model)))
    changed = {n for n, p in model.named_parameters(remove_duplicate=False)
               if not torch.equal(before[n], p.detach())}

    assert changed == trainable
    if method == "full-ft":
        assert prepared.trainable_params == sum(p.numel() for p in MODELS[arch]().parameters())
    else:
        assert all(TRAINABLE_MARKER[method] in n for n in trainable)


def test_lora_skips_output_head() -> None:
    prepared = build_method("lora", tiny_llama())
    assert not any("lm_head" in n for n, _ in prepared.model.named_parameters() if "lora_" in n)
    assert prepared.hyperparameters["r"] == 8


def test_ia3_records_architecture_defaults() -> None:
    assert build_method("ia3", tiny_llama()).hyperparameters == {
        "target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}


@pytest.mark.parametrize("method", method_params(["houlsby", "compacter", "prefix-tuning", "lora"]))
def test_cached_generation_matches_full_forward(method: str) -> None:
    model = build_method(method, tiny_llama(), **OVERRIDES.get(method, {})).model.eval()
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        for step, logits in enumerate(out.logits):
            prefix = out.sequences[:, : ids.shape[1] + step]
            full = model(input_ids=prefix, attention_mask=torch.ones_like(prefix)).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)


@NEEDS_ADAPTERS
def test_untrained_houlsby_equals_base_model() -> None:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = tiny_llama().eval()(input_ids=ids).logits
        actual = build_method("houlsby", tiny_llama()).model.eval()(input_ids=ids).logits
    assert torch.equal(actual, expected)


@NEEDS_ADAPTERS
def test_compacter_rejects_indivisible_bottleneck() -> None:
    with pytest.raises(ValueError, match="phm_dim"):
        build_method("compacter", tiny_llama(), reduction_factor=16)


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="Unknown method"):
        build_method("nope", tiny_llama())


def fishdip_importable() -> bool:
    try:
        return importlib.util.find_spec("fishdip_peft") is not None and bool(
            __import__("fishdip_peft").FishDipConfig)
    except Exception:
        return False


@pytest.mark.skipif(not fishdip_importable(), reason="fishdip_peft is not importable yet")
@pytest.mark.parametrize("method", FISHDIP_METHODS)
def test_fishdip_methods_train_at_most_k_entries(method: str) -> None:
    base = tiny_llama()
    k = round(0.01 * sum(p.numel() for p in base.parameters()))
    base_before = [(p, p.detach().clone()) for p in base.parameters()]
    prepared = build_method(method, base)
    assert prepared.trainable_params == k
    assert prepared.hyperparameters["dynamic"] == (method != "fixed-fish")
    assert prepared.hyperparameters["sample_aware"] == (method != "fishdip-no-sample-aware")

    assert torch.isfinite(torch.tensor(train_step(prepared.model)))
    moved = sum(int((before != p.detach()).sum()) for p, before in base_before)
    assert moved <= k

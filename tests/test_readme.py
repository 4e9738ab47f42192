"""The README's quick start runs as written (on a tiny model instead of the hub checkpoint)."""

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.models import causal_batch, tiny_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_blocks() -> list[str]:
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quick_start_trains_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(lambda *args, **kwargs: tiny_llama()))
    train, load = quick_start_blocks()
    namespace = {"train_loader": [causal_batch(i) for i in range(3)]}
    exec(compile(train, "README quick start", "exec"), namespace)
    trained = namespace["model"]
    assert trained.base_model.refresh_count == 1
    assert (tmp_path / "fishdip-adapter" / "adapter_model.safetensors").exists()
    exec(compile(load, "README loading", "exec"), namespace)
    batch = causal_batch(9)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](**batch).logits, trained(**batch).logits, atol=1e-5, rtol=0)


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make bench" in text

"""The README's code runs as written (on a tiny model instead of the hub checkpoint)."""

import re
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from fishdip_peft import FishDipConfig
from tests.models import causal_batch, tiny_llama
from tests.test_trainer import RowDataset

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(heading: str) -> list[str]:
    section = README.read_text().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_quick_start_trains_with_the_plain_trainer_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(lambda *args, **kwargs: tiny_llama()))
    train, load = python_blocks("Quick start")
    namespace = {"train_dataset": RowDataset(16)}
    exec(compile(train, "README quick start", "exec"), namespace)
    trained = namespace["model"]
    assert trained.base_model.step_count == 300 and trained.base_model.refresh_count == 3
    assert (tmp_path / "fishdip-adapter" / "adapter_model.safetensors").exists()
    exec(compile(load, "README loading", "exec"), namespace)
    batch = causal_batch(9)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](**batch).logits, trained(**batch).logits, atol=1e-5, rtol=0)


def test_custom_loop_with_step_runs_as_written():
    (loop,) = python_blocks("Custom training loops")
    model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, update_every=2, num_regressing=3))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    namespace = {"model": model, "optimizer": optimizer, "train_loader": [causal_batch(i) for i in range(5)]}
    exec(compile(loop, "README custom loop", "exec"), namespace)
    assert model.base_model.step_count == 5 and model.base_model.refresh_count == 3


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make bench" in text


def test_readme_links_every_committed_benchmark_report():
    """Each committed benchmark report is reachable from the README, so a section cannot vanish unnoticed."""
    text = README.read_text()
    results = README.parent / "benchmarks" / "results"
    reports = sorted(p.relative_to(README.parent).as_posix() for p in results.rglob("*.md"))
    assert reports, "no committed benchmark report found"
    missing = [r for r in reports if f"]({r})" not in text and f"]({r.rsplit('/', 1)[0]}/)" not in text]
    assert not missing, f"README links none of: {missing}"

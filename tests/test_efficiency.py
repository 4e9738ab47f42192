"""Smoke test of the efficiency benchmark (tiny model only) and checks of its two baselines' mechanics."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.dense_mask import DenseMaskFishDip
from benchmarks.efficiency import compute_ratios, compute_targets
from benchmarks.sddmm_prototype import enable_sampled_linear_grads
from fishdip_peft import FishDipConfig, forward_with_per_sample_losses
from tests.models import causal_batch, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"model", "method", "step_seconds", "step_cpu_seconds", "peak_memory_bytes", "checkpoint_bytes",
            "changed_entries", "bytes_per_changed_entry", "save_seconds", "load_seconds", "params_total",
            "trainable_entries", "rss_after_import_bytes", "load_max_abs_logit_diff"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency") / "efficiency.json"
    command = [sys.executable, "-m", "benchmarks.efficiency", "--sizes", "tiny", "--methods", "full-ft,lora,fishdip",
               "--batch-size", "2", "--seq-len", "8", "--warmup", "1", "--steps", "2", "--n", "3",
               "--refresh-repeats", "1", "--scaling-n", "1,2", "--threads", "1", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(out.read_text())


def test_json_schema(smoke_run):
    _, data = smoke_run
    assert data["complete"] is True
    assert data["command"].startswith("python -m benchmarks.efficiency ")
    assert {"torch", "torch_threads", "cpu", "loadavg_start", "loadavg_end"} <= set(data["environment"])
    assert data["settings"]["batch_size"] == 2 and data["settings"]["seq_len"] == 8
    assert data["settings"]["dtype"] == "fp32"
    rows = data["methods"]
    assert [r["method"] for r in rows] == ["full-ft", "lora", "fishdip"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert row["model"] == "tiny"
        assert row["step_seconds"] > 0 and row["peak_memory_bytes"] > row["rss_after_import_bytes"] > 0
        assert row["checkpoint_bytes"] > 0 and row["changed_entries"] > 0
        assert row["load_max_abs_logit_diff"] < 1e-4  # the saved checkpoint reproduces the trained model
    fish = rows[2]
    assert fish["refresh_n"] == 3 and fish["refresh_seconds"] > 0 and fish["refresh_peak_memory_bytes"] > 0
    assert 0 < fish["changed_entries"] <= fish["params_total"]
    assert fish["checkpoint_bytes"] < rows[0]["checkpoint_bytes"]
    assert rows[1]["trainable_entries"] < fish["trainable_entries"] * 10
    scaling = data["scaling"]
    assert [(r["model"], r["n"]) for r in scaling["refresh_vs_n"]] == [("tiny", 1), ("tiny", 2)]
    assert all(r["refresh_seconds"] > 0 for r in scaling["refresh_vs_n"])
    assert scaling["refresh_vs_model_size"][0]["model"] == "tiny"


def test_ratios_are_consistent_with_the_rows(smoke_run):
    _, data = smoke_run
    rows = {r["method"]: r for r in data["methods"]}
    ratios = data["ratios"]["tiny"]
    fish, full, lora = rows["fishdip"], rows["full-ft"], rows["lora"]
    expected = {
        "step_fishdip_over_full_ft": fish["step_seconds"] / full["step_seconds"],
        "step_fishdip_over_lora": fish["step_seconds"] / lora["step_seconds"],
        "memory_fishdip_over_full_ft": fish["peak_memory_bytes"] / full["peak_memory_bytes"],
        "memory_fishdip_over_lora": fish["peak_memory_bytes"] / lora["peak_memory_bytes"],
        "refresh_over_step_fishdip": fish["refresh_seconds"] / fish["step_seconds"],
        "checkpoint_bytes_per_changed_entry_fishdip": fish["checkpoint_bytes"] / fish["changed_entries"],
    }
    for key, value in expected.items():
        assert math.isclose(ratios[key], value, rel_tol=1e-12), key
    assert ratios["step_dense_mask_over_full_ft"] is None  # dense-mask was not run
    assert data["ratios"] == compute_ratios(data["methods"])
    targets = data["targets"]
    assert targets == compute_targets(data["ratios"], "tiny")
    assert len(targets) == 5
    for target in targets:
        assert target["met"] == (target["value"] <= target["limit"])


def test_report_only_renders_the_table(smoke_run):
    out, data = smoke_run
    subprocess.run([sys.executable, "-m", "benchmarks.efficiency", "--report-only", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    text = out.with_name("EFFICIENCY.md").read_text()
    assert data["command"] in text
    for method in ("full-ft", "lora", "fishdip"):
        assert f"| tiny | {method} |" in text


def test_dense_mask_baseline_moves_only_masked_entries():
    model = tiny_llama()
    model.train()
    dense = DenseMaskFishDip(model, density=0.05, update_every=100, num_regressing=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = causal_batch(0)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    assert dense.step(losses, batch)  # the first call builds the dense float mask
    outputs.loss.backward()
    dense.mask_gradients()
    optimizer.step()
    total = sum(p.numel() for p in model.parameters())
    assert int(sum(m.sum() for m in dense.mask.values())) == int(total * 0.05)
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        assert not bool((moved & (dense.mask[name] == 0)).any()), name


def test_sddmm_prototype_gives_the_core_gradients():
    from peft import get_peft_model

    grads = []
    for sampled in (False, True):
        model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, num_regressing=3))
        if sampled:
            assert enable_sampled_linear_grads(model) > 0
        for seed in range(2):
            batch = causal_batch(seed)
            model.base_model.fishdip_state.values.grad = None
            outputs, losses = forward_with_per_sample_losses(model, batch)
            model.step(losses, batch)
            outputs.loss.backward()
        grads.append(model.base_model.fishdip_state.values.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)

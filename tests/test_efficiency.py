"""Smoke test of the efficiency benchmark (tiny model only), its dense-mask baseline, its refresh variants and
its sequence-length run."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.efficiency.cli import parse_args
from benchmarks.efficiency.measure import SIZE_CONFIGS
from benchmarks.efficiency.report import compute_ratios, compute_targets, render_report
from benchmarks.efficiency.workers import REFRESH_VARIANTS, refresh_variant
from benchmarks.methods import build_method, get_method
from fishdip_peft import forward_with_per_sample_losses
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
               "--refresh-repeats", "1", "--scaling-n", "1,2", "--threads", "1", "--jobs", "2",
               "--refresh-variant-sizes", "tiny", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(out.read_text())


def test_json_schema(smoke_run):
    _, data = smoke_run
    assert data["complete"] is True
    assert data["command"].startswith("python -m benchmarks.efficiency ")
    assert {"torch", "torch_threads", "cpu", "loadavg_start", "loadavg_end"} <= set(data["environment"])
    assert data["environment"]["core_sha256_consistent"] is True
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
    assert "prototypes" not in data


def test_persistent_state(smoke_run):
    _, data = smoke_run
    fish = data["methods"][2]
    parts = fish["persistent_state_breakdown_bytes"]
    assert set(parts) == {"values", "index", "touched", "base", "stash", "optimizer"}
    assert sum(parts.values()) == fish["persistent_state_bytes"]
    assert parts["values"] == 4 * fish["trainable_entries"] and parts["optimizer"] >= 2 * parts["values"]
    assert 0 < fish["persistent_state_fixed_bytes"] <= 64  # AdamW's step counter
    assert fish["persistent_state_bytes_per_entry"] == (
        fish["persistent_state_bytes"] - fish["persistent_state_fixed_bytes"]) / fish["trainable_entries"]
    assert fish["persistent_state_slots"] > 0
    assert "persistent_state_bytes" not in data["methods"][0]  # full-ft has no FISH-DIP state


def test_refresh_variants_section(smoke_run):
    _, data = smoke_run
    rows = data["refresh_variants"]["rows"]
    assert [r["variant"] for r in rows] == [name for name, _, _ in REFRESH_VARIANTS]
    for row in rows:
        assert row["model"] == "tiny" and row["n"] == 3
        assert row["refresh_seconds"] > 0 and row["fisher_seconds"] > 0 and row["topk_seconds"] > 0
    assert rows[0]["selection_overlap_with_reference"] == 1.0
    assert rows[1]["selection_overlap_with_reference"] >= 0.99  # batched: the same Fisher, exact
    assert 0.5 < rows[2]["selection_overlap_with_reference"] <= 1.0


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
    assert ratios["persistent_state_bytes_per_entry_fishdip"] == fish["persistent_state_bytes_per_entry"]
    bf16 = [r for r in data["refresh_variants"]["rows"] if r["variant"] == "one-pass-per-sample-bf16"]
    assert math.isclose(ratios["refresh_one_pass_per_sample_bf16_over_step_fishdip"],
                        bf16[0]["refresh_seconds"] / fish["step_seconds"], rel_tol=1e-12)
    assert data["ratios"] == compute_ratios(data["methods"], data["refresh_variants"]["rows"])
    targets = data["targets"]
    assert targets == compute_targets(data["ratios"], "tiny")
    assert [t["ratio"] for t in targets] == [
        "step_fishdip_over_lora", "step_fishdip_over_full_ft", "memory_fishdip_over_lora",
        "refresh_over_step_fishdip", "refresh_one_pass_per_sample_bf16_over_step_fishdip",
        "checkpoint_bytes_per_changed_entry_fishdip", "persistent_state_bytes_per_entry_fishdip"]
    assert [t["limit"] for t in targets] == [0.9, 0.7, 0.8, 2.0, 2.0, 8.5, 24.0]
    assert targets[0]["value_cpu_time"] == ratios["step_cpu_fishdip_over_lora"]
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
    assert "## Refresh variants" in text and "| tiny | 3 | batched-bf16 |" in text
    assert "## FISH-DIP persistent state" in text
    old = {**data, "prototypes": {"rows": [{"variant": "core"}]}}
    del old["refresh_variants"]
    assert "superseded" in render_report(old)


def test_dense_mask_baseline_moves_only_masked_entries():
    method = get_method("dense-mask")
    prepared = build_method("dense-mask", tiny_llama(), density=0.05, update_every=100, num_regressing=3)
    model, dense = prepared.model, prepared.controller
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=method.adamw_weight_decay)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = causal_batch(0)
    outputs, losses = forward_with_per_sample_losses(model, batch)
    assert method.step(prepared, losses, batch)  # the first call builds the dense float mask
    outputs.loss.backward()
    method.after_backward(prepared)  # masks the dense gradients
    optimizer.step()
    total = sum(p.numel() for p in model.parameters())
    assert int(sum(m.sum() for m in dense.mask.values())) == int(total * 0.05)
    for name, param in model.named_parameters():
        moved = param.detach() != before[name]
        assert not bool((moved & (dense.mask[name] == 0)).any()), name


def test_refresh_variants_use_the_core_settings_and_restore_them():
    prepared = build_method("fishdip", tiny_llama(), density=0.05, update_every=1, num_regressing=2)
    config = prepared.model.peft_config[prepared.model.active_adapter]
    with refresh_variant(prepared.model, "bfloat16", 15):
        assert (config.fisher_dtype, config.fisher_batch_size) == ("bfloat16", 15)
    assert (config.fisher_dtype, config.fisher_batch_size) == ("float32", 1)
    assert [name for name, _, _ in REFRESH_VARIANTS] == ["one-pass-per-sample", "batched", "one-pass-per-sample-bf16",
                                                         "batched-bf16"]


def test_two_layer_size_has_the_135m_width():
    config = SIZE_CONFIGS["2l"]
    assert config == dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                          num_key_value_heads=3)
    assert parse_args(["--sizes", "2l", "--seq-lens", "32,64"]).seq_lens == [32, 64]


def test_seq_lens_section_and_table(smoke_run, tmp_path):
    out = tmp_path / "efficiency.json"
    shutil.copy(smoke_run[0], out)
    command = [sys.executable, "-m", "benchmarks.efficiency", "--seq-lens", "8,16", "--sizes", "tiny", "--methods",
               "lora,fishdip", "--batch-size", "1", "--warmup", "1", "--steps", "1", "--refresh-repeats", "0",
               "--threads", "1", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["methods"] == smoke_run[1]["methods"]  # the main rows stay as they are
    section = data["seq_lens"]
    assert [(r["seq_len"], r["method"]) for r in section["rows"]] == [
        (8, "lora"), (8, "fishdip"), (16, "lora"), (16, "fishdip")]
    assert all("error" not in r and r["batch_size"] == 1 and "refresh_seconds" not in r for r in section["rows"])
    fish16, lora16 = section["rows"][3], section["rows"][2]
    assert math.isclose(section["ratios"]["16"]["tiny"]["step_fishdip_over_lora"],
                        fish16["step_seconds"] / lora16["step_seconds"])
    text = out.with_name("EFFICIENCY.md").read_text()
    assert "## Step cost vs sequence length" in text and "| 16 | tiny | fishdip |" in text

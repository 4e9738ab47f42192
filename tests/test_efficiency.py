"""Smoke test of the efficiency benchmark (tiny model only), its dense-mask baseline and its refresh prototypes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.efficiency.cli import parse_args
from benchmarks.efficiency.report import compute_ratios, compute_targets
from benchmarks.efficiency.workers import PROTOTYPE_VARIANTS, worker_prototypes
from benchmarks.methods import build_method, get_method
from benchmarks.refresh_prototype import empirical_fisher, fast_global_topk_indices
from fishdip_peft import forward_with_per_sample_losses
from fishdip_peft.fisher import empirical_fisher as core_empirical_fisher
from fishdip_peft.pool import slice_sample
from fishdip_peft.selection import global_topk_indices
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
               "--refresh-repeats", "1", "--scaling-n", "1,2", "--threads", "1", "--jobs", "2", "--prototype-sizes", "",
               "--out", str(out)]
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
    assert targets[0]["value_cpu_time"] == ratios["step_cpu_fishdip_over_full_ft"]
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


def test_refresh_prototypes_are_exact_where_they_claim_to_be():
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        scores = [torch.randint(0, 6, shape, generator=g).float() * 0.25 for shape in [(7, 5), (13,), (3, 4, 2), (1,)]]
        for k in (1, 5, 17, 40, 69):
            for a, b in zip(global_topk_indices(scores, k), fast_global_topk_indices(scores, k)):
                assert torch.equal(a, b)
    with pytest.raises(ValueError):
        fast_global_topk_indices([torch.tensor([1.0, float("nan")])], 1)
    with pytest.raises(ValueError):
        fast_global_topk_indices([torch.tensor([1.0, -2.0])], 1)
    model = tiny_llama()  # tied embeddings: the LM head's dense and the embedding's sparse gradient are summed
    batch = causal_batch(0)
    samples = [slice_sample(batch, row) for row in range(3)]
    params = list(model.parameters())
    for a, b in zip(core_empirical_fisher(model, samples, params), empirical_fisher(model, samples, params)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-12)
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))


def test_prototype_worker_schema(monkeypatch):
    import benchmarks.efficiency.workers as workers

    monkeypatch.setattr(workers, "build_model", lambda size, dtype, device: tiny_llama())
    args = parse_args(["--batch-size", "2", "--seq-len", "8", "--n", "2", "--refresh-repeats", "1"])
    args.size = "tiny"
    result = worker_prototypes(args)
    assert [r["variant"] for r in result["rows"]] == [name for name, _ in PROTOTYPE_VARIANTS]
    for row in result["rows"]:
        assert row["refresh_seconds"] > 0 and row["fisher_seconds"] > 0 and row["topk_seconds"] > 0
        if "bf16" not in row["variant"]:
            assert row["selection_overlap_with_core"] >= 0.99

"""Efficiency benchmark: FISH-DIP against full fine-tuning, LoRA and the original dense-mask code style.

Run `python -m benchmarks.efficiency` (see `--help`). For every model size and method the parent process
starts a fresh worker subprocess, so the peak memory of one method never mixes with another's. A worker
builds the model, runs warm-up steps, then times training steps (forward + backward + optimizer step; for
FISH-DIP the `step()` call too, on non-refresh steps), then times mask refreshes with n = num_regressing
pooled samples (FISH-DIP and dense-mask), then saves and loads a checkpoint. Another worker per size times
refreshes for several n. Results go to `benchmarks/results/efficiency.json` (rewritten atomically after
every worker, so a long run leaves partial results) and `--report-only` turns that JSON into
`benchmarks/results/EFFICIENCY.md`.

Memory: on CPU the peak resident set size (VmHWM) of a measurement window; before each window the worker
runs `gc.collect()` and glibc `malloc_trim(0)` (so memory freed earlier is not counted) and resets the peak
(`/proc/self/clear_refs` 5). The RSS includes the ~0.3-0.4 GB of the Python/torch libraries, which the
report also lists (`rss_after_import_bytes`). On CUDA, `torch.cuda.max_memory_allocated` of the window.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.io import write_json_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS_DIR / "efficiency.json"
METHODS = ("full-ft", "lora", "fishdip", "dense-mask", "fishdip-sddmm", "fishdip-lowmem", "fishdip-lean")
# The last three are FISH-DIP with benchmark-only prototypes of proposed core patches: fishdip-sddmm
# (benchmarks/sddmm_prototype.py), fishdip-lowmem (benchmarks/lowmem_prototype.py) and fishdip-lean (both).
FISHDIP_METHODS = ("fishdip", "fishdip-sddmm", "fishdip-lowmem", "fishdip-lean")
SIZES = ("tiny", "35m", "135m")
SCHEMA_VERSION = 1
SMOLLM2_VOCAB = 49152
# Randomly initialised Llama models with SmolLM2's vocabulary (and its rope/norm settings); "135m" is the
# real SmolLM2-135M-Instruct (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads).
SIZE_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "35m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6,
                num_key_value_heads=2),
}
LORA_HP = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", bias="none")
LEARNING_RATE = 1e-4
TARGETS = (  # (name, ratio key, limit, the same ratio from CPU time and from the fastest step) for FISH-DIP
    ("step time <= 1.0x full fine-tuning", "step_fishdip_over_full_ft", 1.0, "step_cpu_fishdip_over_full_ft",
     "step_min_fishdip_over_full_ft"),
    ("peak memory <= 0.6x full fine-tuning", "memory_fishdip_over_full_ft", 0.6, None, None),
    ("peak memory <= 1.3x LoRA", "memory_fishdip_over_lora", 1.3, None, None),
    ("one refresh (n=15) <= 3x one training step", "refresh_over_step_fishdip", 3.0,
     "refresh_cpu_over_step_cpu_fishdip", "refresh_min_over_step_min_fishdip"),
    ("checkpoint <= 8.5 bytes per changed entry", "checkpoint_bytes_per_changed_entry_fishdip", 8.5, None, None),
)


# ----------------------------------------------------------------------------------------------------
# memory and timing helpers
# ----------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    rss = _status_kib("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak memory of a window: VmHWM after a reset (Linux), else a 1 ms RSS sampler; CUDA: max allocated."""

    def __init__(self, device: str):
        self.device = device
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def start(self) -> int:
        import torch

        gc.collect()
        _malloc_trim()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "sampled"
            self._stop.clear()
            self._sampled = current_rss()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return current_rss()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, current_rss())
            time.sleep(0.001)

    def peak(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            return max(self._sampled, current_rss())
        return _status_kib("VmHWM") or current_rss()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def core_sha256() -> str:
    """SHA-256 of the imported `fishdip_peft` sources, so rows measured on different core code can be told apart."""
    import hashlib

    import fishdip_peft

    digest = hashlib.sha256()
    for file in sorted(Path(fishdip_peft.__file__).resolve().parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------------
# models, data and methods
# ----------------------------------------------------------------------------------------------------
def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_model(size: str, dtype_name: str, device: str):
    """A causal LM of the given size (random init with a fixed seed, or the default SmolLM2-135M)."""
    import torch

    dtype = _dtype(dtype_name)
    if size == "135m":
        from benchmarks.default_model import load_default_model

        model = load_default_model(dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=SMOLLM2_VOCAB, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZE_CONFIGS[size],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    return model.to(device)


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int, device: str) -> dict:
    """Random token ids, no padding, every token a target (labels = input_ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": input_ids.clone().to(device),
    }


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


class Runner:
    """One method on one model: `train_step()`, `refresh()`, checkpoint save/load."""

    def __init__(self, method: str, model, args):
        import torch

        self.method, self.args = method, args
        self.dense = None
        model.train()
        if getattr(args, "gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            if method not in ("full-ft", "dense-mask"):  # reentrant checkpointing needs inputs that require grad
                model.enable_input_require_grads()
        if method == "full-ft":
            model.requires_grad_(True)
            self.model = model
            params = list(model.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        elif method == "lora":
            from peft import LoraConfig, get_peft_model

            self.model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA_HP))
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        elif method in FISHDIP_METHODS:
            from peft import get_peft_model

            from fishdip_peft import FishDipConfig

            config = FishDipConfig(density=args.density, update_every=args.update_every, num_regressing=args.n)
            self.model = get_peft_model(model, config)
            if method in ("fishdip-sddmm", "fishdip-lean"):
                from benchmarks.sddmm_prototype import enable_sampled_linear_grads

                enable_sampled_linear_grads(self.model)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
        elif method == "dense-mask":
            from benchmarks.dense_mask import DenseMaskFishDip

            self.model = model
            self.dense = DenseMaskFishDip(model, args.density, args.update_every, args.n)
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}.")
        self.trainable = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        self.refreshed = False

    def train_step(self, batch) -> float:
        from fishdip_peft import forward_with_per_sample_losses

        self.optimizer.zero_grad(set_to_none=True)
        self.refreshed = False
        if self.method in FISHDIP_METHODS:  # the README's order: step() before backward()
            if self.method in ("fishdip-lowmem", "fishdip-lean"):
                from benchmarks.lowmem_prototype import forward_with_per_sample_losses_fused

                outputs, losses = forward_with_per_sample_losses_fused(self.model, batch)
            else:
                outputs, losses = forward_with_per_sample_losses(self.model, batch)
            self.refreshed = self.model.step(losses, batch)
            outputs.loss.backward()
        elif self.method == "dense-mask":
            outputs, losses = forward_with_per_sample_losses(self.model, batch)
            self.refreshed = self.dense.step(losses, batch)  # before backward: the refresh uses .grad
            outputs.loss.backward()
            self.dense.mask_gradients()
        else:
            outputs = self.model(**batch)
            outputs.loss.backward()
        self.optimizer.step()
        loss = float(outputs.loss.detach())
        del outputs
        return loss

    def refresh(self) -> None:
        """A mask refresh from the current pool (the samples of the steps since the last refresh)."""
        if self.method in FISHDIP_METHODS:
            self.model.refresh_mask()
        else:
            self.dense.refresh()


def _file_bytes(folder: Path) -> tuple[int, int, list[str]]:
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return weights, total, sorted(f.name for f in folder.iterdir())


def _safetensors_entries(folder: Path) -> dict[str, int]:
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                counts[key] = math.prod(handle.get_slice(key).get_shape())
    return counts


# ----------------------------------------------------------------------------------------------------
# workers (one fresh process each)
# ----------------------------------------------------------------------------------------------------
def _progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


def worker_train(args) -> dict[str, Any]:
    """Time and measure training steps, refreshes and the checkpoint of one method on one model."""
    import torch

    _set_threads(args)
    rss_import = current_rss()
    load_start = _loadavg()
    started = time.perf_counter()
    device = args.device
    meter = PeakMeter(device)
    model = build_model(args.size, args.dtype, device)
    vocab = model.config.vocab_size
    params_total = count_params(model)
    runner = Runner(args.method, model, args)
    rss_build = current_rss()
    batches = [make_batch(args.batch_size, args.seq_len, vocab, seed, device) for seed in range(4)]
    row: dict[str, Any] = {
        "model": args.size, "method": args.method, "params_total": params_total,
        "trainable_entries": runner.trainable, "memory_kind": "cuda_allocated" if device.startswith("cuda") else "rss",
        "rss_after_import_bytes": rss_import, "rss_after_build_bytes": rss_build,
        "torch_threads": torch.get_num_threads(), "core_sha256": core_sha256(),
    }
    step = 0

    def run_step(desc: str) -> tuple[float, bool, float]:
        nonlocal step
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        runner.train_step(batches[step % len(batches)])
        _sync(device)
        step += 1
        return time.perf_counter() - t0, runner.refreshed, time.process_time() - c0

    warmup = [run_step("warm-up") for _ in _progress(range(args.warmup), desc=f"{args.size}/{args.method} warm-up")]
    row["warmup_step_seconds"] = [round(t, 4) for t, _, _ in warmup]
    if runner.method != "full-ft" and runner.method != "lora":
        row["first_mask_seconds_in_step"] = round(warmup[0][0], 4) if warmup else None
    row["peak_memory_with_warmup_bytes"] = meter.peak() if not device.startswith("cuda") else None
    if runner.method in ("fishdip-lowmem", "fishdip-lean"):  # after the first mask: a core without the flat buffer
        from benchmarks.lowmem_prototype import drop_flat_mask_buffer

        row["mask_buffer_bytes_dropped"] = drop_flat_mask_buffer(runner.model)

    row["memory_at_window_start_bytes"] = meter.start()
    timed = [run_step("timed") for _ in _progress(range(args.steps), desc=f"{args.size}/{args.method} steps")]
    row["peak_memory_bytes"] = meter.peak()
    if any(refreshed for _, refreshed, _ in timed):
        row["warning"] = "a timed step refreshed the mask; raise --update-every"
    times = [t for t, _, _ in timed]
    row["step_seconds"] = statistics.median(times)
    row["step_seconds_min"] = min(times)
    row["step_seconds_all"] = [round(t, 4) for t in times]
    row["step_cpu_seconds"] = statistics.median([c for _, _, c in timed])

    if runner.method in ("fishdip", "dense-mask"):  # fishdip-sddmm refreshes with the same core code
        refresh_times, refresh_peaks, refresh_cpu = [], [], []
        for repeat in _progress(range(args.refresh_repeats), desc=f"{args.size}/{args.method} refresh"):
            if repeat:  # refill the pool with fresh samples: ceil(n / batch) non-refresh steps
                for _ in range(max(1, math.ceil(args.n / args.batch_size))):
                    run_step("refill")
            meter.start()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runner.refresh()
            _sync(device)
            refresh_times.append(time.perf_counter() - t0)
            refresh_cpu.append(time.process_time() - c0)
            refresh_peaks.append(meter.peak())
        row["refresh_n"] = args.n
        row["refresh_seconds"] = statistics.median(refresh_times)
        row["refresh_cpu_seconds"] = statistics.median(refresh_cpu)
        row["refresh_seconds_all"] = [round(t, 4) for t in refresh_times]
        row["refresh_peak_memory_bytes"] = max(refresh_peaks)

    # -- checkpoint ---------------------------------------------------------------------------------
    runner.optimizer.zero_grad(set_to_none=True)
    runner.optimizer = None
    gc.collect()
    probe = {k: v[:2] for k, v in batches[0].items()}
    trained = runner.model
    trained.eval()
    with torch.no_grad():
        reference = trained(**probe).logits.float()
    folder = Path(tempfile.mkdtemp(prefix=f"fishdip-eff-{args.size}-{args.method}-"))
    try:
        _sync(device)
        t0 = time.perf_counter()
        trained.save_pretrained(str(folder))
        row["save_seconds"] = time.perf_counter() - t0
        row["checkpoint_bytes"], row["checkpoint_dir_bytes"], row["checkpoint_files"] = _file_bytes(folder)
        entries = _safetensors_entries(folder)
        row["stored_entries"] = sum(entries.values())
        del trained, runner, model
        gc.collect()
        base = build_model(args.size, args.dtype, device)
        t0 = time.perf_counter()
        if args.method in FISHDIP_METHODS + ("lora",):
            from peft import PeftModel

            import fishdip_peft  # noqa: F401  (registers the FISH-DIP peft type)

            loaded = PeftModel.from_pretrained(base, str(folder))
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=_dtype(args.dtype)).to(device)
        _sync(device)
        row["load_seconds"] = time.perf_counter() - t0
        loaded.eval()
        with torch.no_grad():
            row["load_max_abs_logit_diff"] = float((loaded(**probe).logits.float() - reference).abs().max())
        if args.method in FISHDIP_METHODS:
            changed = sum(v for k, v in entries.items() if k.endswith("fishdip_indices"))
        elif args.method == "lora":
            changed = sum(v for k, v in entries.items() if "lora_" in k)
        else:  # a full dense model: count the entries that differ from the base
            base_params = dict(base.named_parameters())
            changed = sum(int((p != base_params[name]).sum()) for name, p in loaded.named_parameters())
        row["changed_entries"] = changed
        row["bytes_per_changed_entry"] = row["checkpoint_bytes"] / changed if changed else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    row["worker_seconds"] = time.perf_counter() - started
    row["loadavg_start"], row["loadavg_end"] = load_start, _loadavg()
    return row


def worker_scaling(args) -> dict[str, Any]:
    """Refresh time and peak memory of FISH-DIP for several n (update_every=1: every step() refreshes)."""
    import torch
    from peft import get_peft_model

    from fishdip_peft import FishDipConfig, forward_with_per_sample_losses

    _set_threads(args)
    load_start = _loadavg()
    device = args.device
    meter = PeakMeter(device)
    model = build_model(args.size, args.dtype, device)
    params_total = count_params(model)
    rows = []
    for n in _progress(args.scaling_n, desc=f"{args.size} refresh scaling"):
        peft_model = get_peft_model(model, FishDipConfig(density=args.density, update_every=1, num_regressing=n))
        pool = make_batch(max(n, args.batch_size), args.seq_len, model.config.vocab_size, 100 + n, device)
        with torch.no_grad():
            _, losses = forward_with_per_sample_losses(peft_model, pool)
        times, peaks, cpu = [], [], []
        for _ in range(1 + args.refresh_repeats):  # the first call builds the mask, later ones refresh it
            meter.start()
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            refreshed = peft_model.step(losses, pool)
            _sync(device)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            peaks.append(meter.peak())
            assert refreshed or len(times) > 1, "the first step() call must build the mask"
        rows.append({
            "model": args.size, "params_total": params_total, "n": n,
            "first_mask_seconds": times[0], "refresh_seconds": statistics.median(times[1:]),
            "refresh_seconds_all": [round(t, 4) for t in times[1:]],
            "refresh_cpu_seconds": statistics.median(cpu[1:]),
            "refresh_peak_memory_bytes": max(peaks), "torch_threads": torch.get_num_threads(),
        })
        model = peft_model.unload()
        del peft_model
    return {"rows": rows, "loadavg_start": load_start, "loadavg_end": _loadavg(), "core_sha256": core_sha256()}


PROTOTYPE_VARIANTS = (  # (name, patch_refresh options or None for the core as it is)
    ("core", None),
    ("sparse-embedding-grads", dict(sparse_embeddings=True, fast_topk=False)),
    ("fast-topk", dict(sparse_embeddings=False, fast_topk=True)),
    ("sparse-embedding-grads+fast-topk", dict(sparse_embeddings=True, fast_topk=True)),
    ("sparse-embedding-grads+fast-topk+bf16-autocast", dict(sparse_embeddings=True, fast_topk=True,
                                                            autocast_dtype="bfloat16")),
)


def worker_prototypes(args) -> dict[str, Any]:
    """Refresh time of the core and of the benchmarks/refresh_prototype.py variants on the same pooled samples,
    with each variant's selection compared to the core's (fraction of the K entries in common)."""
    import torch
    from peft import get_peft_model

    import fishdip_peft.model as core
    from benchmarks.refresh_prototype import patch_refresh
    from fishdip_peft import FishDipConfig, forward_with_per_sample_losses

    _set_threads(args)
    load_start = _loadavg()
    model = build_model(args.size, args.dtype, args.device)
    peft_model = get_peft_model(model, FishDipConfig(density=args.density, update_every=1, num_regressing=args.n))
    state = peft_model.base_model.fishdip_state
    pool = make_batch(max(args.n, args.batch_size), args.seq_len, model.config.vocab_size, 200, args.device)
    with torch.no_grad():
        _, losses = forward_with_per_sample_losses(peft_model, pool)
    peft_model.step(losses, pool)  # the first mask (not timed)
    rows, reference = [], None
    for _ in _progress(range(args.refresh_repeats), desc=f"{args.size} refresh prototypes"):
        for name, options in PROTOTYPE_VARIANTS:
            phases = {"fisher": 0.0, "topk": 0.0}
            patch = contextlib.nullcontext() if options is None else patch_refresh(**{
                **options, "autocast_dtype": getattr(torch, options["autocast_dtype"]) if options.get("autocast_dtype")
                else None})
            with patch:
                saved = core.empirical_fisher, core.global_topk_indices

                def timed(fn, phase):
                    def run(*a, **k):
                        t0 = time.perf_counter()
                        try:
                            return fn(*a, **k)
                        finally:
                            phases[phase] += time.perf_counter() - t0

                    return run

                core.empirical_fisher, core.global_topk_indices = timed(saved[0], "fisher"), timed(saved[1], "topk")
                try:
                    _sync(args.device)
                    t0, c0 = time.perf_counter(), time.process_time()
                    peft_model.step(losses, pool)
                    _sync(args.device)
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                finally:
                    core.empirical_fisher, core.global_topk_indices = saved
            selection = state.flat_selection()
            if name == "core":
                reference = selection
            common = int(torch.isin(selection, reference).sum()) if reference is not None else None
            rows.append({"model": args.size, "n": args.n, "variant": name, "refresh_seconds": seconds,
                         "refresh_cpu_seconds": cpu, "fisher_seconds": phases["fisher"], "topk_seconds": phases["topk"],
                         "other_seconds": seconds - phases["fisher"] - phases["topk"],
                         "selection_overlap_with_core": None if common is None else common / state.k})
    return {"rows": rows, "loadavg_start": load_start, "loadavg_end": _loadavg(), "torch_threads": torch.get_num_threads(),
            "core_sha256": core_sha256()}


# ----------------------------------------------------------------------------------------------------
# profiling (python -m benchmarks.efficiency --profile --size 135m --method fishdip)
# ----------------------------------------------------------------------------------------------------
def transient_allocations(prof) -> tuple[int, list[tuple[str, int, int]]]:
    """Peak of the memory allocated inside a profiled window (above what was live when it began) and what
    was live at that peak, grouped by allocating op (`op <- caller <- ...`): [(ops, bytes, count)]."""
    from torch._C._profiler import _EventType
    from torch.profiler._memory_profiler import OpTree

    events = []
    for event in OpTree(prof.profiler.kineto_results).dfs():
        if event.typed[0] == _EventType.Allocation:
            fields = event.typed[1]
            names, op = [], event.parent
            while op is not None and len(names) < 4:
                if not op.name.startswith(("aten::empty", "aten::zeros", "aten::new_", "aten::resize")) or not names:
                    names.append(op.name)
                op = op.parent
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr, " <- ".join(names)))
    events.sort(key=lambda e: e[0])
    live: dict[int, tuple[int, str]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for _, size, ptr, names in events:
        if size > 0:
            live[ptr] = (size, names)
            current += size
        elif ptr in live:
            current -= live.pop(ptr)[0]
        if current > peak:
            peak, at_peak = current, dict(live)
    groups: dict[str, list[int]] = {}
    for size, names in at_peak.values():
        entry = groups.setdefault(names, [0, 0])
        entry[0] += size
        entry[1] += 1
    return peak, sorted(((k, v[0], v[1]) for k, v in groups.items()), key=lambda g: -g[1])


def profile_method(args) -> None:
    """Print where a training step (and, for FISH-DIP and dense-mask, a refresh) spends time and memory."""
    import torch
    from torch.profiler import profile, record_function

    _set_threads(args)
    model = build_model(args.size, args.dtype, args.device)
    runner = Runner(args.method, model, args)
    batches = [make_batch(args.batch_size, args.seq_len, model.config.vocab_size, s, args.device) for s in range(3)]
    for batch in batches:  # warm-up; the first step builds the mask; the pool fills
        runner.train_step(batch)

    def show(title: str, prof) -> None:
        print(f"\n=== {title}: ops by self CPU time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
        peak, groups = transient_allocations(prof)
        print(f"=== {title}: peak of memory allocated in the window: {peak / 2**20:,.1f} MiB; live at the peak ===")
        for names, size, count in groups[: args.profile_rows]:
            print(f"{size / 2**20:10,.1f} MiB {count:5d}x  {names}")

    with profile(profile_memory=True, record_shapes=True) as prof:
        with record_function("train_step"):
            runner.train_step(batches[0])
    show(f"{args.size}/{args.method} training step", prof)
    if args.method in ("fishdip", "dense-mask"):
        if args.method == "fishdip":
            import fishdip_peft.model as core

            def phase(name, fn):
                def wrapped(*a, **k):
                    with record_function(name):
                        return fn(*a, **k)

                return wrapped

            core.empirical_fisher = phase("PHASE fisher (per-sample forward+backward)", core.empirical_fisher)
            core.global_topk_indices = phase("PHASE global top-K", core.global_topk_indices)
            state = runner.model.base_model.fishdip_state
            state.set_selection = phase("PHASE set_selection", state.set_selection)
        else:
            dense = runner.dense
            from benchmarks.dense_mask import DenseMaskFishDip

            def importance(samples, _self=dense):
                with record_function("PHASE per-sample gradients + dense gradient dict"):
                    return DenseMaskFishDip._importance(_self, samples)

            dense._importance = importance
        with profile(profile_memory=True, record_shapes=True) as prof:
            with record_function("refresh"):
                runner.refresh()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile_rows))
        show(f"{args.size}/{args.method} refresh (n={args.n})", prof)


# ----------------------------------------------------------------------------------------------------
# the parent: tasks, ratios, JSON
# ----------------------------------------------------------------------------------------------------
def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:  # EFFICIENCY_GIT_COMMIT: the commit a source snapshot without .git was exported from
        commit = os.environ.get("EFFICIENCY_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fishdip_peft", "benchmarks"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.splitlines()
    except OSError:
        commit, dirty = "", []
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "git_commit": commit,
        "uncommitted_files": [line[3:] for line in dirty], "core_sha256": core_sha256(),
        "source": os.environ.get("EFFICIENCY_SOURCE", str(Path(__file__).resolve().parents[1])),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["memory_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return env


def _row(rows, size, method):
    return next((r for r in rows if r.get("model") == size and r.get("method") == method and "error" not in r), None)


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compute_ratios(rows: list[dict]) -> dict[str, dict[str, Optional[float]]]:
    """Ratios between the rows of each model size (only from figures of this run)."""
    ratios = {}
    for size in dict.fromkeys(r["model"] for r in rows):
        get = {m: _row(rows, size, m) or {} for m in METHODS}
        fish, full, lora, dense = get["fishdip"], get["full-ft"], get["lora"], get["dense-mask"]
        sddmm, lowmem, lean = get["fishdip-sddmm"], get["fishdip-lowmem"], get["fishdip-lean"]
        net = lambda r: r["peak_memory_bytes"] - r["rss_after_import_bytes"] if r else None  # noqa: E731
        ratios[size] = {
            "step_fishdip_over_full_ft": _ratio(fish.get("step_seconds"), full.get("step_seconds")),
            "step_fishdip_over_lora": _ratio(fish.get("step_seconds"), lora.get("step_seconds")),
            "step_dense_mask_over_full_ft": _ratio(dense.get("step_seconds"), full.get("step_seconds")),
            "step_cpu_fishdip_over_full_ft": _ratio(fish.get("step_cpu_seconds"), full.get("step_cpu_seconds")),
            "step_min_fishdip_over_full_ft": _ratio(fish.get("step_seconds_min"), full.get("step_seconds_min")),
            "step_cpu_fishdip_over_lora": _ratio(fish.get("step_cpu_seconds"), lora.get("step_cpu_seconds")),
            "memory_fishdip_over_full_ft": _ratio(fish.get("peak_memory_bytes"), full.get("peak_memory_bytes")),
            "memory_fishdip_over_lora": _ratio(fish.get("peak_memory_bytes"), lora.get("peak_memory_bytes")),
            "memory_dense_mask_over_full_ft": _ratio(dense.get("peak_memory_bytes"), full.get("peak_memory_bytes")),
            "memory_fishdip_over_dense_mask": _ratio(fish.get("peak_memory_bytes"), dense.get("peak_memory_bytes")),
            "net_memory_fishdip_over_full_ft": _ratio(net(fish), net(full)) if fish and full else None,
            "net_memory_fishdip_over_lora": _ratio(net(fish), net(lora)) if fish and lora else None,
            "refresh_over_step_fishdip": _ratio(fish.get("refresh_seconds"), fish.get("step_seconds")),
            "refresh_cpu_over_step_cpu_fishdip": _ratio(fish.get("refresh_cpu_seconds"), fish.get("step_cpu_seconds")),
            "refresh_min_over_step_min_fishdip": _ratio(min(fish["refresh_seconds_all"]) if fish.get("refresh_seconds_all")
                                                        else None, fish.get("step_seconds_min")),
            "refresh_over_step_dense_mask": _ratio(dense.get("refresh_seconds"), dense.get("step_seconds")),
            "refresh_fishdip_over_dense_mask": _ratio(fish.get("refresh_seconds"), dense.get("refresh_seconds")),
            "refresh_memory_fishdip_over_full_ft_step": _ratio(fish.get("refresh_peak_memory_bytes"),
                                                               full.get("peak_memory_bytes")),
            "checkpoint_bytes_per_changed_entry_fishdip": fish.get("bytes_per_changed_entry"),
            "step_fishdip_sddmm_over_full_ft": _ratio(sddmm.get("step_seconds"), full.get("step_seconds")),
            "step_fishdip_sddmm_over_fishdip": _ratio(sddmm.get("step_seconds"), fish.get("step_seconds")),
            "step_cpu_fishdip_sddmm_over_fishdip": _ratio(sddmm.get("step_cpu_seconds"), fish.get("step_cpu_seconds")),
            "memory_fishdip_sddmm_over_full_ft": _ratio(sddmm.get("peak_memory_bytes"), full.get("peak_memory_bytes")),
            "memory_fishdip_sddmm_over_lora": _ratio(sddmm.get("peak_memory_bytes"), lora.get("peak_memory_bytes")),
            "memory_fishdip_lowmem_over_full_ft": _ratio(lowmem.get("peak_memory_bytes"), full.get("peak_memory_bytes")),
            "memory_fishdip_lowmem_over_lora": _ratio(lowmem.get("peak_memory_bytes"), lora.get("peak_memory_bytes")),
            "step_cpu_fishdip_lowmem_over_fishdip": _ratio(lowmem.get("step_cpu_seconds"), fish.get("step_cpu_seconds")),
            "step_fishdip_lean_over_full_ft": _ratio(lean.get("step_seconds"), full.get("step_seconds")),
            "memory_fishdip_lean_over_full_ft": _ratio(lean.get("peak_memory_bytes"), full.get("peak_memory_bytes")),
            "memory_fishdip_lean_over_lora": _ratio(lean.get("peak_memory_bytes"), lora.get("peak_memory_bytes")),
            "checkpoint_fishdip_over_lora": _ratio(fish.get("checkpoint_bytes"), lora.get("checkpoint_bytes")),
            "checkpoint_fishdip_over_full_ft": _ratio(fish.get("checkpoint_bytes"), full.get("checkpoint_bytes")),
        }
    return ratios


def compute_targets(ratios: dict, target_model: str) -> list[dict]:
    found = ratios.get(target_model, {})
    out = []
    for name, key, limit, cpu_key, min_key in TARGETS:
        value = found.get(key)
        out.append({"target": name, "model": target_model, "ratio": key, "value": value, "limit": limit,
                    "met": None if value is None else bool(value <= limit),
                    "value_cpu_time": found.get(cpu_key) if cpu_key else None,
                    "value_fastest": found.get(min_key) if min_key else None})
    return out


def _fit_line(points: list[tuple[float, float]]) -> Optional[dict]:
    if len(points) < 2:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return {"fixed_seconds": my - slope * mx, "seconds_per_sample": slope}


def compute_scaling(rows: list[dict], scaling_rows: list[dict]) -> dict[str, Any]:
    by_size = []
    for size in dict.fromkeys(r["model"] for r in rows):
        fish = _row(rows, size, "fishdip")
        if fish and "refresh_seconds" in fish:
            by_size.append({
                "model": size, "params_total": fish["params_total"], "n": fish["refresh_n"],
                "refresh_seconds": fish["refresh_seconds"], "step_seconds": fish["step_seconds"],
                "refresh_over_step": _ratio(fish["refresh_seconds"], fish["step_seconds"]),
                "refresh_peak_memory_bytes": fish["refresh_peak_memory_bytes"],
            })
    fits = {}
    for size in dict.fromkeys(r["model"] for r in scaling_rows):
        fits[size] = _fit_line([(r["n"], r["refresh_seconds"]) for r in scaling_rows if r["model"] == size])
    return {"refresh_vs_n": scaling_rows, "refresh_vs_n_fit": fits, "refresh_vs_model_size": by_size}


def _worker_argv(args, kind: str, size: str, method: str, out: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.efficiency", "--worker", kind, "--size", size, "--method", method,
            "--worker-out", out, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
            "--dtype", args.dtype, "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--density", str(args.density), "--update-every", str(args.update_every), "--n", str(args.n),
            "--refresh-repeats", str(args.refresh_repeats), "--threads", str(args.threads),
            "--scaling-n", ",".join(map(str, args.scaling_n))]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def _settings(args, target_model: str) -> dict[str, Any]:
    return {
        "sizes": args.sizes, "methods": args.methods, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "dtype": args.dtype, "device": args.device, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "density": args.density, "update_every": args.update_every, "num_regressing": args.n,
        "refresh_repeats": args.refresh_repeats, "threads": args.threads or None, "scaling_n": args.scaling_n,
        "scaling_sizes": args.scaling_sizes, "prototype_sizes": args.prototype_sizes, "target_model": target_model,
        "jobs": args.jobs, "gradient_checkpointing": args.gradient_checkpointing, "optimizer": f"torch.optim.AdamW lr={LEARNING_RATE} (defaults: weight_decay=0.01; "
        "dense-mask: weight_decay=0)", "lora": LORA_HP, "fishdip_values_dtype": "float32",
        "size_configs": SIZE_CONFIGS, "data": "random token ids, no padding, every token a target",
        "memory": "peak RSS (VmHWM) of each window after gc + malloc_trim + peak reset, one fresh process per "
                  "(model, method); on CUDA max_memory_allocated",
    }


def _run_tasks(args, tasks: list[tuple[str, str, str]], on_result) -> None:
    """Run the worker subprocesses (`--jobs` at once); `on_result(results)` after each one finishes."""
    from tqdm import tqdm

    results: dict[int, dict] = {}

    def run_task(kind: str, size: str, method: str) -> dict:
        handle, worker_out = tempfile.mkstemp(prefix="fishdip-eff-", suffix=".json")
        os.close(handle)
        try:
            proc = subprocess.run(_worker_argv(args, kind, size, method, worker_out), stdout=sys.stderr,
                                  stderr=subprocess.PIPE, text=True, timeout=args.worker_timeout)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            if args.verbose:
                sys.stderr.write(proc.stderr[-2000:])
            return json.loads(Path(worker_out).read_text())
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
            print(f"[efficiency] {kind} {size}/{method} failed:\n{str(error)[-3000:]}", file=sys.stderr)
            return {"model": size, "method": method, "kind": kind, "error": str(error)[-3000:]}
        finally:
            Path(worker_out).unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool, \
            tqdm(total=len(tasks), desc="efficiency", file=sys.stderr, dynamic_ncols=True) as bar:
        futures = {pool.submit(run_task, *task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_result([(tasks[i], results[i]) for i in sorted(results)])
            bar.update(1)


def _prototype_section(command: str, done) -> dict[str, Any]:
    rows = [row for (kind, _, _), r in done if kind == "prototypes" for row in r.get("rows", [])]
    errors = [r for (kind, _, _), r in done if kind == "prototypes" and "error" in r]
    section: dict[str, Any] = {"command": command, "rows": rows, "loadavg": [
        [r.get("loadavg_start"), r.get("loadavg_end")] for (kind, _, _), r in done if kind == "prototypes"]}
    if errors:
        section["errors"] = errors
    return section


def run_all(args, command: str) -> dict:
    out_path = Path(args.out)
    target_model = args.target_model or args.sizes[-1]
    prototype_sizes = args.prototype_sizes if args.prototype_sizes is not None else [target_model]
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "complete": False, "command": command,
        "settings": _settings(args, target_model),
        "environment": environment(), "methods": [], "ratios": {}, "targets": [], "scaling": {},
    }
    data["environment"]["loadavg_start"] = _loadavg()
    data["environment"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tasks = [("train", size, method) for size in args.sizes for method in args.methods]
    tasks += [("scaling", size, "fishdip") for size in args.scaling_sizes]
    tasks += [("prototypes", size, "fishdip") for size in prototype_sizes]
    begin = time.perf_counter()

    def record(done) -> None:
        data["methods"] = [r for (kind, _, _), r in done if kind == "train"]
        scaling_rows = [row for (kind, _, _), r in done if kind == "scaling" for row in r.get("rows", [])]
        errors = [r for (kind, _, _), r in done if kind == "scaling" and "error" in r]
        if errors:
            data["errors"] = errors
        data["ratios"] = compute_ratios(data["methods"])
        data["targets"] = compute_targets(data["ratios"], target_model)
        data["scaling"] = compute_scaling(data["methods"], scaling_rows)
        if prototype_sizes:
            data["prototypes"] = _prototype_section(command, done)
        data["environment"]["loadavg_end"] = _loadavg()
        data["environment"]["elapsed_seconds"] = time.perf_counter() - begin
        versions = {r.get("core_sha256") for _, r in done if r.get("core_sha256")} | {data["environment"]["core_sha256"]}
        data["environment"]["core_sha256_consistent"] = len(versions) == 1
        write_json_atomic(out_path, data)

    _run_tasks(args, tasks, record)
    data["complete"] = True
    data["environment"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(out_path, data)
    return data


def run_variant_only(args, command: str) -> dict:
    """Measure `--methods` on `--sizes` under other settings and store them in the existing JSON's
    `variants[--variant-only]` (with their own ratios; the main rows stay as they are)."""
    out_path = Path(args.out)
    data = json.loads(out_path.read_text())
    target_model = args.target_model or args.sizes[-1]
    env = environment()
    variant = {"command": command, "settings": _settings(args, target_model), "methods": [], "ratios": {},
               "targets": [], "loadavg_start": _loadavg(),
               "environment": {k: env[k] for k in ("git_commit", "uncommitted_files", "core_sha256", "source")}}

    def record(done) -> None:
        variant["methods"] = [r for _, r in done]
        variant["ratios"] = compute_ratios(variant["methods"])
        variant["targets"] = compute_targets(variant["ratios"], target_model)
        variant["loadavg_end"] = _loadavg()
        data.setdefault("variants", {})[args.variant_only] = variant
        write_json_atomic(out_path, data)

    _run_tasks(args, [("train", size, method) for size in args.sizes for method in args.methods], record)
    return data


def run_prototypes_only(args, command: str) -> dict:
    """Measure the refresh prototypes on `--sizes` and store them in the existing JSON's `prototypes`."""
    out_path = Path(args.out)
    data = json.loads(out_path.read_text())

    def record(done) -> None:
        data["prototypes"] = _prototype_section(command, done)
        data["prototypes"]["settings"] = {"threads": args.threads or None, "n": args.n, "seq_len": args.seq_len,
                                          "batch_size": args.batch_size, "refresh_repeats": args.refresh_repeats}
        write_json_atomic(out_path, data)

    _run_tasks(args, [("prototypes", size, "fishdip") for size in args.sizes], record)
    return data


# ----------------------------------------------------------------------------------------------------
# the markdown report
# ----------------------------------------------------------------------------------------------------
def _mib(x) -> str:
    return "–" if x is None else f"{x / 2**20:,.0f}"


def _num(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}"


def render_report(data: dict, notes: str = "") -> str:
    s = data["settings"]
    env = data["environment"]
    lines = [
        "# Efficiency: FISH-DIP vs full fine-tuning, LoRA and the original dense-mask code",
        "",
        "Generated by `python -m benchmarks.efficiency --report-only` from `benchmarks/results/efficiency.json`"
        + ("" if data.get("complete") else " (**partial run**)") + ".",
        "",
        f"Command: `{data['command']}`",
        "",
        f"Setting: batch {s['batch_size']} x {s['seq_len']} tokens, {s['dtype']} weights on {s['device']}, "
        f"{s['warmup_steps']} warm-up + {s['timed_steps']} timed steps (median), density {s['density']}, "
        f"n = {s['num_regressing']}, {s['optimizer']}; LoRA r={s['lora']['r']} (alpha {s['lora']['lora_alpha']}, "
        f"dropout {s['lora']['lora_dropout']}) on all linear layers. "
        f"Environment: torch {env['torch']}, {s.get('threads') or env['torch_threads']} torch thread(s) per worker, "
        f"{env['cpu']} ({env['cpu_count']} cores), load average {env.get('loadavg_start')} at start, "
        f"{env.get('loadavg_end')} at the end (1/5/15 min). Step and refresh times are wall-clock medians; "
        "*CPU s* is the process CPU time of the same steps, which other processes' load inflates less.",
        "",
        "Memory is the peak RSS of the measurement window (it includes ~"
        f"{_mib(statistics.median([r.get('rss_after_import_bytes', 0) for r in data['methods']] or [0]))}"
        " MiB of Python/torch libraries, column *import*); *refresh peak* is the peak of a mask refresh "
        "with the training state alive. Checkpoint bytes are the weight files' size.",
        "",
        "| model | method | params | trainable | step s | step CPU s | peak MiB | import MiB | refresh s (n) "
        "| refresh CPU s | refresh peak MiB | ckpt MiB | changed entries | B/changed | save s | load s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["methods"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | error: {r['error'].strip().splitlines()[-1][:80]} |"
                         + " |" * 13)
            continue
        refresh = f"{_num(r['refresh_seconds'], 2)} ({r['refresh_n']})" if "refresh_seconds" in r else "–"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['params_total'] / 1e6:.1f}M | {_num(r['trainable_entries'])} "
            f"| {_num(r['step_seconds'], 3)} | {_num(r.get('step_cpu_seconds'), 3)} | {_mib(r['peak_memory_bytes'])} "
            f"| {_mib(r['rss_after_import_bytes'])} | {refresh} | {_num(r.get('refresh_cpu_seconds'), 2)} "
            f"| {_mib(r.get('refresh_peak_memory_bytes'))} | {r['checkpoint_bytes'] / 2**20:,.2f} "
            f"| {_num(r['changed_entries'])} | {_num(r['bytes_per_changed_entry'], 2)} | {_num(r['save_seconds'], 2)} "
            f"| {_num(r['load_seconds'], 2)} |"
        )
    lines += ["", f"## Targets (FISH-DIP on `{s['target_model']}`)", "",
              "*value*: from the wall-clock medians (the figure judged); *CPU*: from CPU-time medians; *fastest*: "
              "from the fastest step and refresh.", "",
              "| target | value | met | CPU | fastest |", "|---|---:|---|---:|---:|"]
    for t in data["targets"]:
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {_num(t['value'], 3)} | {met} | {_num(t.get('value_cpu_time'), 3)} "
                     f"| {_num(t.get('value_fastest'), 3)} |")
    lines += ["", "## Ratios (within this run)", ""]
    sizes = list(data["ratios"])
    if sizes:
        lines += ["| ratio | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes)]
        for key in data["ratios"][sizes[0]]:
            lines.append(f"| {key} | " + " | ".join(_num(data["ratios"][z].get(key), 3) for z in sizes) + " |")
    scaling = data.get("scaling", {})
    if scaling.get("refresh_vs_n"):
        lines += ["", "## Refresh time vs n (FISH-DIP, update_every=1, median of repeats)", "",
                  "| model | params | n | refresh s | first mask s | refresh peak MiB |", "|---|---:|---:|---:|---:|---:|"]
        for r in scaling["refresh_vs_n"]:
            lines.append(f"| {r['model']} | {r['params_total'] / 1e6:.1f}M | {r['n']} | {_num(r['refresh_seconds'], 2)} "
                         f"| {_num(r['first_mask_seconds'], 2)} | {_mib(r['refresh_peak_memory_bytes'])} |")
        fits = [(z, f) for z, f in scaling.get("refresh_vs_n_fit", {}).items() if f]
        if fits:
            lines += ["", "Least-squares fit refresh = fixed + per_sample · n: " + "; ".join(
                f"{z}: {f['fixed_seconds']:.2f} s + {f['seconds_per_sample']:.3f} s/sample" for z, f in fits) + "."]
    if scaling.get("refresh_vs_model_size"):
        lines += ["", "## Refresh time vs model size (FISH-DIP, n = 15, with training state)", "",
                  "| model | params | refresh s | step s | refresh / step |", "|---|---:|---:|---:|---:|"]
        for r in scaling["refresh_vs_model_size"]:
            lines.append(f"| {r['model']} | {r['params_total'] / 1e6:.1f}M | {_num(r['refresh_seconds'], 2)} "
                         f"| {_num(r['step_seconds'], 3)} | {_num(r['refresh_over_step'], 2)} |")
    for name, variant in data.get("variants", {}).items():
        vs = variant["settings"]
        lines += ["", f"## Variant `{name}`: batch {vs['batch_size']} x {vs['seq_len']}, {vs['dtype']}, gradient "
                  f"checkpointing {'on' if vs.get('gradient_checkpointing') else 'off'}", "",
                  f"Command: `{variant['command']}`", "",
                  "| model | method | step s | step CPU s | peak MiB | window start MiB |", "|---|---|---:|---:|---:|---:|"]
        for r in variant["methods"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['method']} | error | | | |")
                continue
            lines.append(f"| {r['model']} | {r['method']} | {_num(r['step_seconds'], 3)} | {_num(r['step_cpu_seconds'], 3)} "
                         f"| {_mib(r['peak_memory_bytes'])} | {_mib(r['memory_at_window_start_bytes'])} |")
        lines += ["", "| target (this variant) | value | met |", "|---|---:|---|"]
        for t in variant["targets"]:
            if t["value"] is not None:
                lines.append(f"| {t['target']} | {_num(t['value'], 3)} | {'yes' if t['met'] else '**no**'} |")
    protos = data.get("prototypes", {})
    if protos.get("rows"):
        lines += ["", "## Refresh prototypes (benchmarks/refresh_prototype.py; same pooled samples; median of repeats)",
                  "", f"Command: `{protos['command']}`", "",
                  "| model | n | variant | refresh s | refresh CPU s | Fisher s | top-K s | other s | same selection as core |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        groups: dict[tuple, list[dict]] = {}
        for r in protos["rows"]:
            groups.setdefault((r["model"], r["n"], r["variant"]), []).append(r)
        for (model, n, variant), rs in groups.items():
            med = lambda key: statistics.median(r[key] for r in rs)  # noqa: E731
            overlap = min(r["selection_overlap_with_core"] for r in rs)
            lines.append(f"| {model} | {n} | {variant} | {med('refresh_seconds'):.2f} | {med('refresh_cpu_seconds'):.2f} "
                         f"| {med('fisher_seconds'):.2f} | {med('topk_seconds'):.2f} | {med('other_seconds'):.2f} "
                         f"| {overlap:.2%} |")
    if notes:
        lines += ["", notes.strip()]
    return "\n".join(lines) + "\n"


NOTES_MARKER = "<!-- notes: kept by --report-only -->"


def write_report(json_path: Path, md_path: Path) -> str:
    data = json.loads(json_path.read_text())
    notes = ""
    if md_path.exists():  # hand-written analysis below the marker survives regeneration
        old = md_path.read_text()
        if NOTES_MARKER in old:
            notes = NOTES_MARKER + old.split(NOTES_MARKER, 1)[1]
    text = render_report(data, notes)
    tmp = md_path.with_name(f".{md_path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, md_path)
    return text


# ----------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=_str_list, default=list(SIZES), help="comma list of tiny,35m,135m")
    p.add_argument("--methods", type=_str_list, default=list(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--scaling-sizes", type=_str_list, default=None, help="sizes for refresh-vs-n (default: --sizes)")
    p.add_argument("--scaling-n", type=_int_list, default=[1, 5, 15], help="n values for refresh-vs-n")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights' dtype")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first builds the FISH-DIP mask)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--update-every", type=int, default=100)
    p.add_argument("--n", type=int, default=15, help="num_regressing for the refresh measurement")
    p.add_argument("--refresh-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    p.add_argument("--target-model", default=None, help="size the targets are checked on (default: last size)")
    p.add_argument("--out", default=str(DEFAULT_JSON), help="JSON path")
    p.add_argument("--report", default=None, help="markdown path (default: EFFICIENCY.md beside the JSON)")
    p.add_argument("--report-only", action="store_true", help="only regenerate the markdown from the JSON")
    p.add_argument("--worker-timeout", type=float, default=3600)
    p.add_argument("--jobs", type=int, default=1, help="workers run at once (>1 distorts timings; for smoke tests)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--profile", action="store_true", help="profile --size/--method in this process, print tables")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="enable (reentrant) gradient checkpointing in every method's model")
    p.add_argument("--variant-only", default=None, metavar="NAME",
                   help="only measure --methods on --sizes and store them as variants[NAME] of the existing JSON")
    p.add_argument("--prototypes-only", action="store_true",
                   help="only run the refresh prototypes (on --sizes) and update the JSON's `prototypes` section")
    p.add_argument("--prototype-sizes", type=_str_list, default=None,
                   help="sizes for the refresh prototypes in a full run (default: the target model)")
    p.add_argument("--worker", choices=("train", "scaling", "prototypes"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for size in args.sizes + (args.scaling_sizes or []):
        if size not in SIZES:
            p.error(f"unknown size {size!r}; choose from {SIZES}")
    for method in args.methods:
        if method not in METHODS:
            p.error(f"unknown method {method!r}; choose from {METHODS}")
    if args.scaling_sizes is None:
        args.scaling_sizes = list(args.sizes)
    for size in args.prototype_sizes or []:
        if size not in SIZES:
            p.error(f"unknown size {size!r}; choose from {SIZES}")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    md_path = Path(args.report) if args.report else Path(args.out).with_name("EFFICIENCY.md")
    if args.profile:
        args.size, args.method = args.size or args.sizes[-1], args.method or "fishdip"
        profile_method(args)
        return 0
    if args.worker:
        result = {"train": worker_train, "scaling": worker_scaling, "prototypes": worker_prototypes}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0
    command = "python -m benchmarks.efficiency" + "".join(" " + shlex.quote(a) for a in argv)
    if args.prototypes_only:
        run_prototypes_only(args, command)
    elif args.variant_only:
        run_variant_only(args, command)
    elif not args.report_only:
        run_all(args, command)
    print(write_report(Path(args.out), md_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

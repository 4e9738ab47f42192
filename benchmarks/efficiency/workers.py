"""The efficiency benchmark's workers: each runs in a fresh process, measures, and returns one JSON row.

- `worker_train`: one method on one model size: warm-up steps, timed training steps (forward + backward +
  optimizer step, with the method's `step` between forward and backward where it has one), then, for a
  method with a mask, timed refreshes with n = num_regressing pooled samples, then a checkpoint saved and
  loaded back.
- `worker_scaling`: FISH-DIP's refresh time and peak memory for several n on one model size.
- `worker_refresh_variants`: the core's refresh under its Fisher settings (`fisher_batch_size` 1 or 15,
  `fisher_dtype` float32 or bfloat16) on the same pooled samples.

What a method does in a step, a refresh and a checkpoint comes from its registry entry
(`benchmarks.methods`); nothing here tests a method's name.
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.efficiency.measure import (
    PeakMeter,
    build_model,
    core_sha256,
    count_params,
    current_rss,
    file_bytes,
    loadavg,
    make_batch,
    progress,
    rebound_in_core,
    safetensors_entries,
    set_threads,
    timed,
)
from benchmarks.methods import REFERENCE, Method, get_method

LEARNING_RATE = 1e-4


class Runner:
    """One registry method on one model: `train_step(batch)`, `refresh()` and its optimizer."""

    def __init__(self, method: Method, model, args):
        import torch

        self.method, self.args = method, args
        model.train()
        if getattr(args, "gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            if not method.trains_whole_model:  # reentrant checkpointing needs inputs that require grad
                model.enable_input_require_grads()
        self.prepared = method.build(model, **method.mask_overrides(args.density, args.update_every, args.n))
        self.model = self.prepared.model
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = {} if method.adamw_weight_decay is None else {"weight_decay": method.adamw_weight_decay}
        self.optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, **decay)
        self.trainable = sum(p.numel() for g in self.optimizer.param_groups for p in g["params"])
        self.refreshed = False

    def train_step(self, batch) -> float:
        from fishdip_peft import forward_with_per_sample_losses

        self.optimizer.zero_grad(set_to_none=True)
        self.refreshed = False
        if self.method.calls_step:  # the README's order: step() before backward()
            outputs, losses = forward_with_per_sample_losses(self.model, batch)
            self.refreshed = bool(self.method.step(self.prepared, losses, batch))
        else:
            outputs = self.model(**batch)
        outputs.loss.backward()
        self.method.after_backward(self.prepared)
        self.optimizer.step()
        loss = float(outputs.loss.detach())
        del outputs
        return loss

    def refresh(self) -> None:
        """A mask refresh from the current pool (the samples of the steps since the last refresh)."""
        self.method.refresh(self.prepared)


def worker_train(args) -> dict[str, Any]:
    """Time and measure training steps, refreshes and the checkpoint of one method on one model."""
    import torch

    set_threads(args)
    rss_import = current_rss()
    load_start = loadavg()
    started = time.perf_counter()
    device = args.device
    meter = PeakMeter(device)
    method = get_method(args.method)
    model = build_model(args.size, args.dtype, device)
    vocab = model.config.vocab_size
    params_total = count_params(model)
    runner = Runner(method, model, args)
    del model  # the runner holds it
    rss_build = current_rss()
    batches = [make_batch(args.batch_size, args.seq_len, vocab, seed, device) for seed in range(4)]
    row: dict[str, Any] = {
        "model": args.size, "method": args.method, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "params_total": params_total,
        "trainable_entries": runner.trainable, "memory_kind": "cuda_allocated" if device.startswith("cuda") else "rss",
        "rss_after_import_bytes": rss_import, "rss_after_build_bytes": rss_build,
        "torch_threads": torch.get_num_threads(), "core_sha256": core_sha256(),
    }
    step = 0

    def run_step() -> tuple[float, bool, float]:
        nonlocal step
        _, seconds, cpu = timed(device, runner.train_step, batches[step % len(batches)])
        step += 1
        return seconds, runner.refreshed, cpu

    label = f"{args.size}/{args.method}"
    warmup = [run_step() for _ in progress(range(args.warmup), desc=f"{label} warm-up")]
    row["warmup_step_seconds"] = [round(t, 4) for t, _, _ in warmup]
    if method.refreshable:
        row["first_mask_seconds_in_step"] = round(warmup[0][0], 4) if warmup else None
    row["peak_memory_with_warmup_bytes"] = meter.peak() if not device.startswith("cuda") else None

    row["memory_at_window_start_bytes"] = meter.start()
    steps = [run_step() for _ in progress(range(args.steps), desc=f"{label} steps")]
    row["peak_memory_bytes"] = meter.peak()
    if any(refreshed for _, refreshed, _ in steps):
        row["warning"] = "a timed step refreshed the mask; raise --update-every"
    times = [t for t, _, _ in steps]
    row["step_seconds"] = statistics.median(times)
    row["step_seconds_min"] = min(times)
    row["step_seconds_all"] = [round(t, 4) for t in times]
    row["step_cpu_seconds"] = statistics.median([c for _, _, c in steps])
    if method.fishdip_adapter:
        row.update(persistent_state(runner.model, runner.optimizer))

    if method.refreshable and args.refresh_repeats > 0:
        refresh_times, refresh_peaks, refresh_cpu = [], [], []
        for repeat in progress(range(args.refresh_repeats), desc=f"{label} refresh"):
            if repeat:  # refill the pool with fresh samples: ceil(n / batch) non-refresh steps
                for _ in range(max(1, math.ceil(args.n / args.batch_size))):
                    run_step()
            meter.start()
            _, seconds, cpu = timed(device, runner.refresh)
            refresh_times.append(seconds)
            refresh_cpu.append(cpu)
            refresh_peaks.append(meter.peak())
        row["refresh_n"] = args.n
        row["refresh_seconds"] = statistics.median(refresh_times)
        row["refresh_cpu_seconds"] = statistics.median(refresh_cpu)
        row["refresh_seconds_all"] = [round(t, 4) for t in refresh_times]
        row["refresh_peak_memory_bytes"] = max(refresh_peaks)

    row.update(measure_checkpoint(runner, args, batches[0]))
    row["worker_seconds"] = time.perf_counter() - started
    row["loadavg_start"], row["loadavg_end"] = load_start, loadavg()
    return row


def persistent_state(model, optimizer) -> dict[str, Any]:
    """Bytes of FISH-DIP's own tensors kept between steps: each adapter's tensors (its trainable `values`),
    each slot's (`index`, `touched`, `base`, `stash`: as stored, not the weight it points to), and the
    optimizer's state of `values` (not `.grad`, which the next step sets to None); each storage counted
    once. Per trainable entry K without the fixed part (0-dim tensors, e.g. AdamW's step), and the number
    of slots."""
    import torch

    def tensors_of(obj) -> dict[str, torch.Tensor]:
        return {name.lstrip("_"): t for name, t in vars(obj).items()
                if isinstance(t, torch.Tensor) and (not isinstance(t, torch.nn.Parameter) or name == "values")}

    adapters = list(model.base_model.sparse_adapters.values())
    found: list[tuple[str, torch.Tensor]] = []
    for adapter in adapters:
        found += tensors_of(adapter).items()
        found += [item for slot in adapter.slots for item in tensors_of(slot).items()]
        state = optimizer.state.get(adapter.values, {})
        found += [("optimizer", t) for t in state.values() if isinstance(t, torch.Tensor)]
    breakdown = dict.fromkeys(("values", "index", "touched", "base", "stash", "optimizer"), 0)
    seen, fixed = set(), 0
    for name, tensor in found:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:  # empty tensors hold 0 bytes
            seen.add(storage.data_ptr())
            breakdown[name] = breakdown.get(name, 0) + storage.nbytes()
            fixed += storage.nbytes() if tensor.dim() == 0 else 0
    total, k = sum(breakdown.values()), sum(adapter.values.numel() for adapter in adapters)
    return {"persistent_state_bytes": total, "persistent_state_fixed_bytes": fixed,
            "persistent_state_bytes_per_entry": (total - fixed) / k if k else None,
            "persistent_state_slots": sum(len(adapter.slots) for adapter in adapters),
            "persistent_state_breakdown_bytes": breakdown}


def measure_checkpoint(runner: Runner, args, batch) -> dict[str, Any]:
    """Save the trained model as the method saves it, load it into a fresh base model, and check both
    give the same logits; bytes on disk, entries stored and entries changed."""
    import torch

    device, method, row = args.device, runner.method, {}
    runner.optimizer.zero_grad(set_to_none=True)
    runner.optimizer = None
    gc.collect()
    probe = {k: v[:2] for k, v in batch.items()}
    prepared = runner.prepared
    prepared.model.eval()
    with torch.no_grad():
        reference = prepared.model(**probe).logits.float()
    folder = Path(tempfile.mkdtemp(prefix=f"fishdip-eff-{args.size}-{args.method}-"))
    try:
        _, row["save_seconds"], _ = timed(device, method.save, prepared, folder)
        row["checkpoint_bytes"], row["checkpoint_dir_bytes"], row["checkpoint_files"] = file_bytes(folder)
        entries = safetensors_entries(folder)
        row["stored_entries"] = sum(entries.values())
        del prepared, runner.prepared, runner.model
        gc.collect()
        base = build_model(args.size, args.dtype, device)
        loaded, row["load_seconds"], _ = timed(device, method.load, base, folder)
        loaded.eval()
        with torch.no_grad():
            row["load_max_abs_logit_diff"] = float((loaded(**probe).logits.float() - reference).abs().max())
        changed = method.changed_entries(entries, loaded, base)
        row["changed_entries"] = changed
        row["bytes_per_changed_entry"] = row["checkpoint_bytes"] / changed if changed else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def _fishdip_with_pool(args, model, n: int, seed: int):
    """The reference FISH-DIP method on `model` (update_every=1) and a pool batch of max(n, batch) samples
    with their losses; `offer_and_refresh()` pools them and refreshes (the first call builds the mask)."""
    import torch

    from fishdip_peft import forward_with_per_sample_losses

    prepared = get_method(REFERENCE).build(model, density=args.density, update_every=1, num_regressing=n)
    pool = make_batch(max(n, args.batch_size), args.seq_len, model.config.vocab_size, seed, args.device)
    with torch.no_grad():
        _, losses = forward_with_per_sample_losses(prepared.model, pool)

    def offer_and_refresh() -> bool:
        prepared.model.offer(losses, pool)
        return prepared.model.refresh_mask()

    return prepared, offer_and_refresh


def worker_scaling(args) -> dict[str, Any]:
    """Refresh time and peak memory of FISH-DIP for several n (the same pooled samples offered again before
    every refresh; the first refresh builds the mask)."""
    import torch

    set_threads(args)
    load_start = loadavg()
    meter = PeakMeter(args.device)
    model = build_model(args.size, args.dtype, args.device)
    params_total = count_params(model)
    rows = []
    for n in progress(args.scaling_n, desc=f"{args.size} refresh scaling"):
        prepared, offer_and_refresh = _fishdip_with_pool(args, model, n, 100 + n)
        times, peaks, cpu = [], [], []
        for _ in range(1 + args.refresh_repeats):  # the first call builds the mask, later ones refresh it
            meter.start()
            _, seconds, cpu_seconds = timed(args.device, offer_and_refresh)
            times.append(seconds)
            cpu.append(cpu_seconds)
            peaks.append(meter.peak())
        assert prepared.model.refresh_count == len(times), "every call must refresh the mask"
        rows.append({
            "model": args.size, "params_total": params_total, "n": n,
            "first_mask_seconds": times[0], "refresh_seconds": statistics.median(times[1:]),
            "refresh_seconds_all": [round(t, 4) for t in times[1:]],
            "refresh_cpu_seconds": statistics.median(cpu[1:]),
            "refresh_peak_memory_bytes": max(peaks), "torch_threads": torch.get_num_threads(),
        })
        model = prepared.model.unload()
        del prepared, offer_and_refresh
    return {"rows": rows, "loadavg_start": load_start, "loadavg_end": loadavg(), "core_sha256": core_sha256()}


REFRESH_VARIANTS = (  # (name, fisher_dtype, fisher_batch_size): the core's refresh under its own settings
    ("one-pass-per-sample", "float32", 1),  # the core's default: the reference selection
    ("batched", "float32", 15),  # FishDipConfig(fisher_batch_size=15)
    ("one-pass-per-sample-bf16", "bfloat16", 1),  # FishDipConfig(fisher_dtype="bfloat16")
    ("batched-bf16", "bfloat16", 15),  # both
)


@contextlib.contextmanager
def refresh_variant(model, fisher_dtype: str, fisher_batch_size: int):
    """While open, the active adapter's config has these `fisher_dtype` and `fisher_batch_size`."""
    config = model.peft_config[model.active_adapter]
    saved = config.fisher_dtype, config.fisher_batch_size
    config.fisher_dtype, config.fisher_batch_size = fisher_dtype, fisher_batch_size
    try:
        yield
    finally:
        config.fisher_dtype, config.fisher_batch_size = saved


@contextlib.contextmanager
def phase_timers(phases: dict[str, float]):
    """Add the seconds spent in the core's Fisher pass and top-K to `phases["fisher"]` and `phases["topk"]`."""
    def clock(phase):
        def wrap(fn):
            def run(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    phases[phase] += time.perf_counter() - t0

            return run

        return wrap

    with rebound_in_core("empirical_fisher", clock("fisher")), rebound_in_core("global_topk_indices", clock("topk")):
        yield


def worker_refresh_variants(args) -> dict[str, Any]:
    """Refresh time of the core under each of `REFRESH_VARIANTS` on the same pooled samples, with each
    variant's selection compared to the first variant's (fraction of the K entries in common)."""
    import torch

    set_threads(args)
    load_start = loadavg()
    model = build_model(args.size, args.dtype, args.device)
    prepared, offer_and_refresh = _fishdip_with_pool(args, model, args.n, 200)
    state = prepared.model.base_model.fishdip_state
    offer_and_refresh()  # the first mask (not timed)
    rows, reference = [], None
    for _ in progress(range(args.refresh_repeats), desc=f"{args.size} refresh variants"):
        for name, fisher_dtype, batch_size in REFRESH_VARIANTS:
            phases = {"fisher": 0.0, "topk": 0.0}
            with refresh_variant(prepared.model, fisher_dtype, batch_size), phase_timers(phases):
                _, seconds, cpu = timed(args.device, offer_and_refresh)
            selection = state.flat_selection()
            reference = selection if reference is None else reference
            common = int(torch.isin(selection, reference).sum())
            rows.append({"model": args.size, "n": args.n, "variant": name, "fisher_dtype": fisher_dtype,
                         "fisher_batch_size": batch_size, "refresh_seconds": seconds, "refresh_cpu_seconds": cpu,
                         "fisher_seconds": phases["fisher"], "topk_seconds": phases["topk"],
                         "other_seconds": seconds - phases["fisher"] - phases["topk"],
                         "selection_overlap_with_reference": common / state.k})
    return {"rows": rows, "reference": REFRESH_VARIANTS[0][0], "loadavg_start": load_start, "loadavg_end": loadavg(),
            "torch_threads": torch.get_num_threads(), "core_sha256": core_sha256()}

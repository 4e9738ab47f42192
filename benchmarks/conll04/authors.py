"""CoNLL'04 in the FISH-DIP authors' regime (their released `scripts/conll04.sh` and `fish_dip.py`).

    python -m benchmarks.conll04.authors --grid --commit         # the whole 1% study, resumable
    python -m benchmarks.conll04.authors --select-lr             # LoRA / full fine-tuning rates on dev
    python -m benchmarks.conll04.authors --fractions 0.05,0.1 --device cuda --grid   # 5% and 10% (GPU)

The regime: 32 sentences a step (at 1% every step holds all 9 training sentences), 1000 / 1600 / 2400
optimizer steps at 1 / 5 / 10%, the rate decaying linearly to 0 without warm-up, gradients clipped to
1.0, and training stops once the loss has stayed below 1e-6 for 20 steps. The methods:

* ``fishdip``: FISH-DIP as the authors run it: `SparseAdafactor` (their Adafactor, lr 1e-2), a refresh
  every 100 steps, the Fisher from the n highest-loss sentences of the training set re-scored with the
  current weights at every refresh and for the first mask, n = min(max(int(0.1 x batches per epoch), 3),
  25), at most N - 1 (n = 3 at every fraction of CoNLL'04);
* ``fishdip-n15``: the same with n = 15 (the paper's text); at 1% the pool then holds all 9 sentences;
* ``fixed-fish``: the fixed FISH mask, same optimizer and first mask, never refreshed;
* ``lora`` and ``full-ft``: AdamW with the same schedule, each at the rate chosen on dev (`--select-lr`):
  a proxy budget of 250 steps at 1% (seed 0) per rate of `LR_GRID`, scored on 80 dev sentences; highest
  mean of entity and relation F1 wins, ties to the smaller rate. A grid whose best rate is at one end
  grows past it (`selection_rates`).

Runs write ``benchmarks/results/conll04/authors_regime/<method>-<fraction>-<seed>.json``. A run saves its
whole training state every 10 minutes (under ``--checkpoint-root``) and resumes from it when started
again, ending bit for bit where an uninterrupted run ends; the state is deleted once the JSON is written.
To carry an unfinished run to another machine, carry its folder: with ``--checkpoint-root`` inside the
checkout it can be committed beside the results (about 20-40 MB for a sparse or LoRA run; full fine-tuning's
1.6 GB of weights and AdamW moments is too large, so its runs must finish where they start).
Run the grid from one fixed commit (a ``git worktree``) and point ``--results-dir`` at the main
checkout: each JSON records the commit that produced it and ``--commit`` commits it where it lands.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.conll04.run import (
    RESULTS_DIR,
    commit_paths,
    execute_plan,
    fraction_name,
    model_name,
    parse_list,
    same_config,
)
from benchmarks.conll04.training import DEFAULT_MODEL, EVAL_BATCH_SIZE, PROTOCOL, resolve_device, subset_size
from benchmarks.io import write_json_atomic
from benchmarks.methods import get_method

STEPS = {0.01: 1000, 0.05: 1600, 0.1: 2400}
BATCH_SIZE = 32
UPDATE_EVERY = 100
FISHDIP_LR = 1e-2
FRACTIONS = (0.01,)
SEEDS = (0, 1, 2)
# name -> (method of the registry `benchmarks.methods`, its overrides, optimizer); for FISH-DIP adapters m and n
# are filled in per fraction.
METHODS = {
    "fishdip": ("fishdip", {}, "adafactor"),
    "fixed-fish": ("fixed-fish", {}, "adafactor"),
    "fishdip-n15": ("fishdip", {"num_regressing": 15}, "adafactor"),
    "lora": ("lora", {}, "adamw"),
    "full-ft": ("full-ft", {}, "adamw"),
}
LR_GRID = {"lora": (3e-4, 1e-3, 3e-3), "full-ft": (1e-5, 3e-5, 1e-4)}
MAX_EXTENSIONS = 2  # rates added to a method's grid while its best rate is at an end (`selection_rates`)
FIRST = ("fishdip", "fixed-fish")  # run by --grid before the dev selection (they run at the authors' rate)
SELECTION = {"train_fraction": 0.01, "seed": 0, "steps": 250, "eval_limit": 80}
RESULTS = RESULTS_DIR / "authors_regime"
LR_FILE_NAME = "lr_selection.json"


def authors_num_regressing(train_sentences: int, batch_size: int = BATCH_SIZE) -> int:
    """n of the authors' script: min(max(int(0.1 x batches per epoch), 3), 25), at most N - 1."""
    batches = -(-train_sentences // batch_size)
    return max(1, min(max(int(0.1 * batches), 3), 25, train_sentences - 1))


def default_checkpoint_root() -> Path:
    from benchmarks.default_model import cache_root

    return cache_root() / "conll04-run-state" / "authors_regime"


def checkpoint_name(name: str, fraction: float, seed: int, eval_split: str, learning_rate: float) -> str:
    rate = f"-lr{learning_rate:g}" if eval_split == "dev" else ""
    return f"{name}-{fraction_name(fraction)}-{seed}-{eval_split}{rate}"


def run_spec(args, name: str, fraction: float, seed: int, steps: int, learning_rate: float, source: str,
             eval_split: str, eval_limit: int | None, command: str) -> dict:
    method, overrides, optimizer = METHODS[name]
    fishdip = get_method(method).fishdip_adapter
    if fishdip:
        n = authors_num_regressing(subset_size(fraction))
        overrides = {"update_every": UPDATE_EVERY, "num_regressing": n, **overrides}
    return {
        "method": method, "train_fraction": fraction, "seed": seed, "steps": steps, "model": args.model,
        "model_spec": args.model, "batch_size": BATCH_SIZE, "eval_batch_size": args.eval_batch_size,
        "dtype": "float32", "device": args.device, "method_overrides": overrides, "protocol": PROTOCOL,
        "eval_max_new_tokens": None, "progress": not args.no_progress, "optimizer": optimizer,
        "lr_schedule": "linear", "early_stop": True, "rescore": fishdip, "learning_rate": learning_rate,
        "learning_rate_source": source, "eval_split": eval_split, "eval_limit": eval_limit, "command": command,
        "regime": "authors", "variant": name,
        "checkpoint_dir": str(args.checkpoint_root / checkpoint_name(name, fraction, seed, eval_split, learning_rate)),
    }


def selected_rate(args, name: str) -> tuple[float, str] | None:
    if name in args.lr:
        return args.lr[name], "command line (--lr)"
    if name not in LR_GRID:
        return FISHDIP_LR, "the authors' rate"
    path = args.results_dir / LR_FILE_NAME
    if not path.is_file():
        return None
    selection = json.loads(path.read_text())
    chosen = selection.get("methods", {}).get(name, {})
    if selection.get("model") != model_name(args.model) or "selected" not in chosen:
        return None
    return float(chosen["selected"]), f"dev selection (authors_regime/{LR_FILE_NAME})"


def selection_score(record: dict) -> float:
    return (record["entity_f1"] + record["relation_f1"]) / 2


def best_rate(rates: list[float], scores: dict[float, float]) -> float:
    """The rate of highest dev score; ties go to the smaller rate."""
    return max(rates, key=lambda r: (scores[r], -r))


def selection_rates(name: str, scores: dict[float, float]) -> list[float]:
    """`LR_GRID[name]`, extended while its best rate is at one end, `MAX_EXTENSIONS` rates at most.

    `scores` maps each finished proxy's rate to its dev score. The half-decade grid goes on with ten times
    its second rate from the top (3e-3 -> 1e-2) or a tenth of its second from the bottom; it stops growing
    while a rate lacks a score, and ties go to the smaller rate.
    """
    rates = sorted(LR_GRID[name])
    for _ in range(MAX_EXTENSIONS):
        if any(r not in scores for r in rates):
            break
        best = best_rate(rates, scores)
        if best == rates[-1]:
            rates.append(float(f"{rates[-2] * 10:.6g}"))
        elif best == rates[0]:
            rates.insert(0, float(f"{rates[1] / 10:.6g}"))
        else:
            break
    return rates


def selection_records(args, name: str, command: str) -> dict[float, dict]:
    """The finished dev proxy runs of `name` under the current configuration, by rate."""
    found = {}
    for path in sorted((args.results_dir / "lr_selection").glob(f"{name}-lr*.json")):
        record = json.loads(path.read_text())
        rate = record.get("learning_rate")
        if rate is not None and same_config(record, selection_spec(args, name, rate, command)):
            found[rate] = record
    return found


def selection_spec(args, name: str, lr: float, command: str) -> dict:
    return run_spec(args, name, SELECTION["train_fraction"], SELECTION["seed"], SELECTION["steps"], lr,
                    "dev selection grid", "dev", SELECTION["eval_limit"], command)


def plan_selection(args, command: str) -> list[tuple[Path, dict]]:
    """The dev proxy runs of every selected method: its grid as extended by the runs finished so far."""
    plan = []
    for name in [m for m in args.methods if m in LR_GRID]:
        scores = {rate: selection_score(r) for rate, r in selection_records(args, name, command).items()}
        for lr in selection_rates(name, scores):
            plan.append((args.results_dir / "lr_selection" / f"{name}-lr{lr:g}.json",
                         selection_spec(args, name, lr, command)))
    return plan


def write_selection(args, command: str) -> dict:
    methods = {}
    for name in LR_GRID:
        records = selection_records(args, name, command)
        if not records:
            continue
        scores = {rate: selection_score(r) for rate, r in records.items()}
        rates = selection_rates(name, scores)
        entry = {"grid": rates, "dev_scores": {
            f"{rate:g}": {"entity_f1": round(r["entity_f1"], 4), "relation_f1": round(r["relation_f1"], 4),
                          "final_train_loss": r.get("final_train_loss")} for rate, r in sorted(records.items())}}
        if all(rate in records for rate in rates):
            entry["selected"] = best_rate(rates, scores)
            entry["at_grid_end"] = entry["selected"] in (rates[0], rates[-1])
        methods[name] = entry
    selection = {
        "model": model_name(args.model),
        "setting": {**SELECTION, "batch_size": BATCH_SIZE, "optimizer": "AdamW", "lr_schedule": "linear",
                    "early_stop": "loss below 1e-6 for 20 steps", "eval_split": "dev",
                    "criterion": "highest (entity F1 + relation F1) / 2 on 80 dev sentences; ties to the smaller "
                                 f"rate; the grid extends past an end that wins, {MAX_EXTENSIONS} rates at most"},
        "command": command, "methods": methods,
    }
    write_json_atomic(args.results_dir / LR_FILE_NAME, selection)
    return selection


def plan_runs(args, names: list[str], seeds: list[int], command: str) -> list[tuple[Path, dict]]:
    plan = []
    for seed in seeds:
        for fraction in args.fractions:
            for name in names:
                rate = selected_rate(args, name)
                if rate is None:
                    print(f"{name}: no learning rate selected on dev yet; run --select-lr first (skipped)")
                    continue
                steps = args.steps or STEPS[fraction]
                spec = run_spec(args, name, fraction, seed, steps, *rate, "test", args.eval_limit, command)
                plan.append((args.results_dir / f"{name}-{fraction_name(fraction)}-{seed}.json", spec))
    return plan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conll04.authors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", type=parse_list, default=list(METHODS), help=f"from: {', '.join(METHODS)}")
    parser.add_argument("--fractions", type=lambda s: parse_list(s, float), default=list(FRACTIONS))
    parser.add_argument("--seeds", type=lambda s: parse_list(s, int), default=list(SEEDS))
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=None, help="smoke tests only: override the step budget")
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE",
                        help="use this learning rate instead of the dev selection (or the authors' 1e-2)")
    parser.add_argument("--eval-limit", type=int, default=None, help="smoke tests only: N test sentences")
    parser.add_argument("--eval-batch-size", type=int, default=EVAL_BATCH_SIZE)
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--checkpoint-root", type=Path, default=None,
                        help="where runs keep their resumable state (default: the cache, outside the repository)")
    parser.add_argument("--select-lr", action="store_true", help="only the dev selection of LoRA / full-ft rates")
    parser.add_argument("--grid", action="store_true",
                        help="seed 0 of fishdip and fixed-fish, the dev selection, seed 0 of the rest, then seeds 1, 2")
    parser.add_argument("--commit", action="store_true", help="git-commit each result JSON as it lands")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m benchmarks.conll04.authors " + shlex.join(sys.argv[1:] if argv is None else argv)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    try:
        resolve_device(args.device)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    args.checkpoint_root = args.checkpoint_root or default_checkpoint_root()
    try:
        args.lr = {m: float(v) for m, _, v in (item.partition("=") for item in args.lr) if m in METHODS}
    except ValueError:
        raise SystemExit("--lr expects METHOD=VALUE, e.g. --lr lora=1e-3") from None
    args.results_dir = args.results_dir.resolve()
    failed: list[Path] = []

    def select() -> None:
        plan: list[tuple[Path, dict]] = []
        while True:  # a grid whose best rate is at an end grows: run the rates it adds
            done = {path for path, _ in plan}
            plan = plan_selection(args, command)
            new = [entry for entry in plan if entry[0] not in done]
            if not new:
                break
            failed.extend(execute_plan(new, args.force, args.commit))
        selection = write_selection(args, command)
        for name, entry in selection["methods"].items():
            print(f"{name}: selected lr {entry.get('selected', 'incomplete')}  dev {entry['dev_scores']}")
        if args.commit:
            commit_paths([args.results_dir / LR_FILE_NAME] + [p for p, _ in plan],
                         f"CoNLL'04 authors' regime: learning rates selected on dev\n\nProduced by: {command}")

    if args.select_lr:
        select()
    elif args.grid:
        first = [m for m in FIRST if m in args.methods]
        failed += execute_plan(plan_runs(args, first, args.seeds[:1], command), args.force, args.commit)
        select()
        rest = [m for m in args.methods if m not in first]
        failed += execute_plan(plan_runs(args, rest, args.seeds[:1], command), args.force, args.commit)
        failed += execute_plan(plan_runs(args, list(args.methods), args.seeds[1:], command), args.force, args.commit)
    else:
        failed += execute_plan(plan_runs(args, list(args.methods), args.seeds, command), args.force, args.commit)
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(p.name for p in failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Re-score stored CoNLL'04 runs with the current parser: `python -m benchmarks.conll04.rescore`.

Every run JSON under ``benchmarks/results/conll04/`` (recursively; a run JSON has ``predictions`` and
``eval_split``) keeps the decoded texts of the sentences it was scored on. This re-parses them with
`tanl.parse_output` against the same gold sentences (`training.eval_sentences` of the run's
``eval_split`` and ``eval_limit``), scores them with `metrics.evaluate`, and rewrites the JSON
atomically with the new ``scores``, ``entity_f1`` and ``relation_f1`` and ``scoring`` = `tanl.SCORING`.
The values the run had before its first re-scoring stay under ``scores_before_rescore`` and are never
overwritten, so running the tool again changes nothing. It writes ``RESCORE.md`` next to the runs: per
run, entity and relation F1 before the first re-scoring -> now, and, for the learning-rate selection
runs, which rate the selection criterion picks with the new scores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from benchmarks.conll04.data import Sentence, load_types
from benchmarks.conll04.metrics import evaluate
from benchmarks.conll04.tanl import SCORING, parse_output
from benchmarks.conll04.training import REPO_ROOT, eval_sentences
from benchmarks.io import write_json_atomic

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" / "conll04"
LR_FILE = REPO_ROOT / "benchmarks" / "conll04" / "lr_selection.json"
REPORT_NAME = "RESCORE.md"
SELECTION_DIRNAME = "lr_selection"
UNVERSIONED = "unversioned"  # the ``scoring`` recorded for runs scored before the field existed


def is_run(record: object) -> bool:
    """A run JSON: stored predictions and the split they were scored on (not e.g. quick_timing.json)."""
    return isinstance(record, dict) and isinstance(record.get("predictions"), list) and "eval_split" in record


def rescored(record: dict, gold: Sequence[Sentence], types: dict) -> dict:
    """A copy of `record` scored with the current parser; raises ValueError if `gold` does not fit it."""
    texts = record["predictions"]
    if len(texts) != len(gold) or record.get("eval_sentences", len(gold)) != len(gold):
        raise ValueError(f"{len(texts)} predictions (eval_sentences {record.get('eval_sentences')}) "
                         f"for {len(gold)} gold sentences")
    scores = evaluate(gold, [parse_output(text, sentence.tokens, types) for sentence, text in zip(gold, texts)])
    before = record.get("scores_before_rescore") or {
        "scoring": record.get("scoring", UNVERSIONED),
        "entity_f1": record["entity_f1"],
        "relation_f1": record["relation_f1"],
        "scores": record.get("scores"),
    }
    updates = {"entity_f1": scores["entity_f1"], "relation_f1": scores["relation_f1"], "scores": scores,
               "scoring": SCORING, "scores_before_rescore": before}
    out = {key: updates.get(key, value) for key, value in record.items()}
    # New fields go right after the scores they describe, not after the long predictions.
    if "scoring" not in record:
        items = list(out.items())
        at = list(out).index("scores") + 1 if "scores" in out else len(items)
        out = dict(items[:at] + [("scoring", SCORING), ("scores_before_rescore", before)] + items[at:])
    return out


def run_paths(results_dir: Path) -> list[tuple[Path, dict]]:
    """Every run JSON under `results_dir`, recursively, sorted by path."""
    runs = []
    for path in sorted(results_dir.rglob("*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        if is_run(record):
            runs.append((path, record))
    return runs


def rescore_all(results_dir: Path, write: bool = True) -> list[dict]:
    """Re-score every run under `results_dir` (rewriting a JSON only when it changes); one row per run."""
    types = load_types()
    gold: dict[tuple[str, int | None], list[Sentence]] = {}
    rows = []
    for path, record in run_paths(results_dir):
        key = (record["eval_split"], record.get("eval_limit"))
        if key not in gold:
            gold[key] = eval_sentences(*key)
        try:
            new = rescored(record, gold[key], types)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if write and new != record:
            write_json_atomic(path, new)
        before = new["scores_before_rescore"]
        rows.append({
            "run": path.relative_to(results_dir).as_posix(), "record": new, "split": key[0],
            "sentences": len(gold[key]), "before_scoring": before["scoring"],
            "entity": (before["entity_f1"], new["entity_f1"]),
            "relation": (before["relation_f1"], new["relation_f1"]),
        })
    return rows


def _change(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.2f} -> {pair[1]:.2f} ({pair[1] - pair[0]:+.2f})"


def changed(row: dict) -> bool:
    """Whether an F1 moved at the two decimals the table shows."""
    return any(f"{a:.2f}" != f"{b:.2f}" for a, b in (row["entity"], row["relation"]))


def selection_lines(rows: list[dict], lr_file: Path) -> list[str]:
    """The rate the selection criterion picks with the re-scored dev runs, against the recorded one."""
    if not lr_file.is_file():
        return []
    with open(lr_file, encoding="utf-8") as f:
        selected = {m: e.get("selected") for m, e in json.load(f).get("methods", {}).items()}
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["run"].startswith(SELECTION_DIRNAME + "/") and row["record"].get("method") in selected:
            by_method[row["record"]["method"]].append(row)
    if not by_method:
        return []
    lines = ["## Learning-rate selection", "",
             f"The criterion of `{lr_file.name}` (highest (entity F1 + relation F1) / 2 on the dev sample, ties to "
             "the smaller rate) applied to the dev runs in `lr_selection/`, before and after the re-scoring. The "
             "test runs use the rate recorded in the file; this tool does not change it.", "",
             "| method | recorded | best before | best now |", "| --- | ---: | ---: | ---: |"]
    for method, runs in sorted(by_method.items()):
        runs = sorted(runs, key=lambda r: r["record"]["learning_rate"])
        best = [max(runs, key=lambda r: (r["entity"][k] + r["relation"][k]) / 2) for k in (0, 1)]
        cells = [f"{b['record']['learning_rate']:g} ({(b['entity'][k] + b['relation'][k]) / 2:.2f})"
                 for k, b in enumerate(best)]
        recorded = selected[method]
        flag = " **differs**" if recorded is not None and best[1]["record"]["learning_rate"] != recorded else ""
        lines.append(f"| {method} | {'none' if recorded is None else f'{recorded:g}'} | {cells[0]} | {cells[1]}{flag} |")
    return lines


def mean_lines(rows: list[dict]) -> list[str]:
    """Means over seeds of the full test runs directly in the results folder, before -> now."""
    groups: dict[tuple[float, str], list[dict]] = defaultdict(list)
    for row in rows:
        r = row["record"]
        if "/" not in row["run"] and row["split"] == "test" and r.get("eval_limit") is None and "method" in r:
            groups[(r["train_fraction"], r["method"])].append(row)
    if not groups:
        return []
    lines = ["## Means over seeds (test runs in this folder)", "",
             "| train | method | seeds | entity F1 | relation F1 |", "| --- | --- | ---: | --- | --- |"]
    for (fraction, method), group in sorted(groups.items()):
        means = {kind: tuple(statistics.fmean(row[kind][k] for row in group) for k in (0, 1))
                 for kind in ("entity", "relation")}
        seeds = ", ".join(str(row["record"].get("seed")) for row in sorted(group, key=lambda r: r["record"].get("seed")))
        lines.append(f"| {100 * fraction:g}% | {method} | {seeds} | {_change(means['entity'])} | "
                     f"{_change(means['relation'])} |")
    return lines


def table(rows: list[dict], command: str, lr_file: Path = LR_FILE) -> str:
    """RESCORE.md: what the tool did, the per-run table old -> new and the summaries."""
    moved = [row for row in rows if changed(row)]
    largest = sorted(rows, key=lambda row: -max(abs(b - a) for a, b in (row["entity"], row["relation"])))[:3]
    befores = sorted({row["before_scoring"] for row in rows})
    lines = [
        "# CoNLL'04 runs re-scored with the current parser", "",
        f"Generated by `{command}`. Each run's stored predictions were parsed again with `tanl.parse_output` "
        f"and scored against the same gold sentences; the runs are now scored as `{SCORING}` "
        "(the rules are in the docstring of `benchmarks/conll04/tanl.py`: tails resolve by generated names only "
        "and may resolve to their own head, which lowers relation F1, and words fused by the tokenizer's clean-up "
        "of spaces align to the input words they join, which gives back entities such as \"Washington, D.C.\") and "
        "keep the earlier scores under `scores_before_rescore`. Old: the scores the run had before its first "
        "re-scoring "
        f"(scoring: {', '.join(befores) if befores else 'none'}); new: now. F1 in percent.", "",
        f"{len(rows)} runs, {len(moved)} changed at two decimals."
        + (" Largest changes: " + "; ".join(
            f"{row['run']} entity {row['entity'][1] - row['entity'][0]:+.2f}, "
            f"relation {row['relation'][1] - row['relation'][0]:+.2f}" for row in largest) + "." if rows else ""), "",
        "| run | scored on | entity F1 old -> new (change) | relation F1 old -> new (change) |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['run']} | {row['split']}, {row['sentences']} sentences | {_change(row['entity'])} | "
                     f"{_change(row['relation'])} |")
    for section in (mean_lines(rows), selection_lines(rows, lr_file)):
        if section:
            lines += [""] + section
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conll04.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--lr-file", type=Path, default=LR_FILE)
    parser.add_argument("--dry-run", action="store_true", help="print the table; write nothing")
    args = parser.parse_args(argv)
    rows = rescore_all(args.results_dir, write=not args.dry_run)
    text = table(rows, shlex.join(["python", "-m", "benchmarks.conll04.rescore", *argv]), args.lr_file)
    print(text, end="")
    if not args.dry_run:
        path = args.results_dir / REPORT_NAME
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
